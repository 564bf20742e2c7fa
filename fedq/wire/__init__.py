"""Wire format: ``PackedTensor`` <-> protobuf with full validation of untrusted input, and chunking.

WARNING: never deserialize Python objects here; every byte from the network is parsed as protobuf
(or, for frames and the bundle's top level, by fedq's own strict protobuf scanners) and validated
before any tensor is allocated. This package imports protobuf only (never grpc), so the codec and
the wire format can be used without a transport.
"""

from fedq.wire.frame import FrameLike, frame_nbytes
from fedq.wire.limits import WireLimits
from fedq.wire.message import (
    MessageKind,
    WireMessage,
    message_from_frames,
    message_to_frame_bytes,
    message_to_frames,
    read_message,
)
from fedq.wire.serde import (
    bundle_from_bytes,
    bundle_pieces,
    bundle_to_bytes,
    packed_from_proto,
    packed_to_proto,
)
from fedq.wire.stream import BundleDecoder, read_message_streaming

__all__ = [
    "BundleDecoder",
    "FrameLike",
    "MessageKind",
    "WireLimits",
    "WireMessage",
    "bundle_from_bytes",
    "bundle_pieces",
    "bundle_to_bytes",
    "frame_nbytes",
    "message_from_frames",
    "message_to_frame_bytes",
    "message_to_frames",
    "packed_from_proto",
    "packed_to_proto",
    "read_message",
    "read_message_streaming",
]
