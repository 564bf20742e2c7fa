"""``WireMessage`` and its framing: one Header frame, then Chunk frames of the serialized bundle.

Why frames: gRPC caps a message at 4 MiB by default and protobuf at 2 GiB, while model updates and
activations can be larger. Streaming 1 MiB chunks is also the fastest way to move bytes over gRPC
(docs/platform.md §4). The receiver checks the header (version, declared size against its limits)
and the chunk sequence (contiguous offsets, no overflow, exact total) and grows its buffer only as
data actually arrives, so a header that lies about the payload size costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from fedq.codec.packed import FORMAT_VERSION, PackedTensor
from fedq.errors import WireFormatError
from fedq.wire.limits import WireLimits
from fedq.wire.pb import tensor_pb2 as pb
from fedq.wire.protowire import encode_varint
from fedq.wire.serde import bundle_from_bytes, bundle_pieces


@dataclass(slots=True)
class WireMessage:
    """One logical message of the protocol (a task, an update, activations, gradients, ...).

    ``kind`` says what it is ("global", "update", "activations", "gradients"),
    ``scalars`` carry small numbers (num_samples, loss, ...), ``tags`` small strings. ``nbytes``
    is set on a received message: the serialized bytes of the frames it arrived in.
    """

    kind: str
    client_id: str
    round: int = 0
    step: int = 0
    scalars: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, PackedTensor] = field(default_factory=dict)
    nbytes: int = field(default=0, compare=False)


def frame_nbytes(frame: pb.Frame) -> int:
    """Serialized size of a frame: the unit fedq's byte counters add up."""
    return int(frame.ByteSize())


def _header(msg: WireMessage, payload_size: int) -> pb.Header:
    if not msg.kind:
        raise WireFormatError("header: field 'kind': must be non-empty")
    if msg.round < 0 or msg.step < 0:
        raise WireFormatError(
            f"header: field 'round'/'step': must be >= 0, got {msg.round}/{msg.step}"
        )
    bad = [k for k, v in msg.scalars.items() if not math.isfinite(v)]
    if bad:
        raise WireFormatError(f"header: field 'scalars': non-finite value for {bad[0]!r}")
    return pb.Header(
        format_version=FORMAT_VERSION,
        kind=msg.kind,
        client_id=msg.client_id,
        round=msg.round,
        step=msg.step,
        payload_size=payload_size,
        scalars=msg.scalars,
        tags=msg.tags,
    )


def message_to_frames(msg: WireMessage, chunk_size: int = 1 << 20) -> Iterator[pb.Frame]:
    """Frames of ``msg``: a Header with the payload size, then Chunks of <= ``chunk_size`` bytes.

    A message without tensors has an empty payload and therefore no chunks. Chunks are cut lazily
    across the bundle's pieces, so the whole payload is never joined into one buffer here.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    pieces = bundle_pieces(msg.tensors) if msg.tensors else []
    total = sum(len(p) for p in pieces)
    yield pb.Frame(header=_header(msg, total))
    offset = 0
    pending: list[memoryview] = []
    pending_size = 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            take = view[: chunk_size - pending_size]
            pending.append(take)
            pending_size += len(take)
            view = view[len(take) :]
            if pending_size == chunk_size:
                yield _chunk_frame(offset, b"".join(pending))
                offset += pending_size
                pending, pending_size = [], 0
    if pending_size:
        yield _chunk_frame(offset, b"".join(pending))


def message_nbytes(msg: WireMessage, chunk_size: int = 1 << 20) -> int:
    """The serialized bytes of ``msg``'s frames (what a byte counter adds up when it is sent),
    computed from the piece lengths without building the chunks."""
    pieces = bundle_pieces(msg.tensors) if msg.tensors else []
    total = sum(len(p) for p in pieces)
    n = pb.Frame(header=_header(msg, total)).ByteSize()
    for offset in range(0, total, chunk_size):
        n += _chunk_frame_nbytes(offset, min(chunk_size, total - offset))
    return n


def _chunk_frame_nbytes(offset: int, size: int) -> int:
    """Serialized size of a Frame holding a Chunk of ``size`` bytes at ``offset``."""
    body = (1 + len(encode_varint(offset)) if offset else 0) + 1 + len(encode_varint(size)) + size
    return 1 + len(encode_varint(body)) + body


def _chunk_frame(offset: int, data: bytes) -> pb.Frame:
    # Set in place: ``pb.Frame(chunk=pb.Chunk(...))`` copies the chunk message into the frame, which
    # costs more than the rest of the send path for 1 MiB chunks.
    frame = pb.Frame()
    frame.chunk.offset = offset
    frame.chunk.data = data
    return frame


def _check_header(header: pb.Header, limits: WireLimits) -> None:
    if header.format_version != FORMAT_VERSION:
        raise WireFormatError(
            f"header: field 'format_version': unsupported version {header.format_version} "
            f"(expected {FORMAT_VERSION})"
        )
    if not header.kind:
        raise WireFormatError("header: field 'kind': must be non-empty")
    if header.payload_size > limits.max_payload_bytes:
        raise WireFormatError(
            f"header: field 'payload_size': {header.payload_size} bytes exceeds limit "
            f"{limits.max_payload_bytes}"
        )
    for key, value in header.scalars.items():
        if not math.isfinite(value):
            raise WireFormatError(f"header: field 'scalars': non-finite value for {key[:80]!r}")


def _decode(header: pb.Header, payload: bytearray, limits: WireLimits) -> WireMessage:
    # ``payload`` is ours alone: the tensors may keep views of it rather than copies.
    tensors = bundle_from_bytes(payload, limits, share=True) if header.payload_size else {}
    return WireMessage(
        kind=header.kind,
        client_id=header.client_id,
        round=int(header.round),
        step=int(header.step),
        scalars=dict(header.scalars),
        tags=dict(header.tags),
        tensors=tensors,
    )


def read_message(frames: Iterator[pb.Frame], limits: WireLimits) -> WireMessage | None:
    """Consume exactly one message's frames from ``frames`` (a stream may carry several).

    Returns None if the stream ends cleanly before a header. Stops right after the last chunk, so a
    bidirectional stream can answer before the peer sends its next message. The chunks are copied
    once, into one buffer that the message's payload tensors then share.
    """
    header = read_header(frames, limits)
    if header is None:
        return None
    buf = bytearray()  # grown as data arrives: the declared size is not trusted for allocation
    nbytes = pb.Frame(header=header).ByteSize()
    for data in payload_chunks(frames, header.payload_size):
        nbytes += _chunk_frame_nbytes(len(buf), len(data))
        buf += data
    msg = _decode(header, buf, limits)
    msg.nbytes = nbytes
    return msg


def read_header(frames: Iterator[pb.Frame], limits: WireLimits) -> pb.Header | None:
    """The next message's checked Header frame, or None if the stream ends cleanly first."""
    first = next(frames, None)
    if first is None:
        return None
    if first.WhichOneof("kind") != "header":
        raise WireFormatError(
            "frame 0: field 'header': the first frame of a message must be a header"
        )
    _check_header(first.header, limits)
    return first.header


def payload_chunks(frames: Iterator[pb.Frame], size: int) -> Iterator[bytes]:
    """The data of the Chunk frames that carry a payload of ``size`` bytes, in order, each
    checked (contiguous offsets, no overflow, no empty chunk) before it is yielded."""
    received = 0
    index = 0
    while received < size:
        index += 1
        frame = next(frames, None)
        if frame is None:
            raise WireFormatError(
                f"frame {index}: field 'chunk': stream ended after {received} of {size} bytes"
            )
        kind = frame.WhichOneof("kind")
        if kind != "chunk":
            raise WireFormatError(
                f"frame {index}: field 'chunk': expected a chunk, got {kind or 'an empty frame'}"
            )
        chunk = frame.chunk
        if chunk.offset != received:
            raise WireFormatError(
                f"frame {index}: field 'chunk.offset': expected {received}, got {chunk.offset}"
            )
        data = chunk.data  # each read of the field is a fresh copy: read it once
        if len(data) > size - received:
            raise WireFormatError(
                f"frame {index}: field 'chunk.data': overflows payload_size {size} "
                f"({received} + {len(data)} bytes)"
            )
        if not data:
            raise WireFormatError(f"frame {index}: field 'chunk.data': empty chunk")
        received += len(data)
        yield data


def message_from_frames(frames: Iterable[pb.Frame], limits: WireLimits) -> WireMessage:
    """Reassemble and validate one message from a complete frame stream (nothing may follow it)."""
    it = iter(frames)
    msg = read_message(it, limits)
    if msg is None:
        raise WireFormatError("frame 0: field 'header': empty stream, no header")
    extra = next(it, None)
    if extra is not None:
        kind = extra.WhichOneof("kind")
        field_name = "header" if kind == "header" else "chunk"
        raise WireFormatError(
            f"frame: field {field_name!r}: unexpected {kind or 'empty'} frame after the payload"
        )
    return msg
