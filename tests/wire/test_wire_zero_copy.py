"""The payload travels without copies: encoding emits views of the tensors, decoding a reassembled
message shares its buffer; the bytes on the wire and the decoded values are exactly protobuf's."""

from __future__ import annotations

import tracemalloc

import pytest
import torch

from fedq.codec import FORMAT_VERSION, QuantSpec, quantize, raw
from fedq.wire import (
    WireLimits,
    WireMessage,
    bundle_from_bytes,
    bundle_pieces,
    bundle_to_bytes,
    message_from_frames,
    message_to_frames,
    packed_from_proto,
    packed_to_proto,
)
from fedq.wire.pb import tensor_pb2 as pb
from fedq.wire.protowire import encode_len_field, split_len_field

LIMITS = WireLimits()


def _tensors() -> dict[str, object]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 24, generator=gen)
    x[2] *= 50.0
    return {
        "plain": quantize(x, 3),
        "rows+outliers": quantize(
            x, 2, QuantSpec(axis=-1, range="sigma", row_scale=True, outlier_ratio=3.0)
        ),
        "empty": quantize(torch.empty(0, 4), 4, QuantSpec(symmetric=True)),
        "fp16": raw(x.half()),
        "bf16": raw(x.bfloat16()),
        "fp32 scalar": raw(torch.tensor(1.5)),
    }


def test_pieces_are_protobuf_bytes_with_payload_views() -> None:
    tensors = _tensors()
    assert tensors["rows+outliers"].outlier_index is not None  # fields after the payload
    whole = pb.TensorBundle(
        format_version=FORMAT_VERSION, tensors=[packed_to_proto(p, n) for n, p in tensors.items()]
    ).SerializeToString()
    pieces = bundle_pieces(tensors)
    assert b"".join(pieces) == whole
    views = [p for p in pieces if isinstance(p, memoryview)]
    assert len(views) == 5  # every non-empty payload, none copied
    plain = tensors["plain"].payload
    plain[0] ^= 0xFF  # a view sees the tensor's memory
    assert b"".join(pieces) != whole


def test_reassembled_message_shares_one_writable_buffer(assert_packed_equal) -> None:
    tensors = _tensors()
    msg = WireMessage.update("c", tensors=tensors)
    back = message_from_frames(message_to_frames(msg, chunk_size=64), LIMITS)
    for name, p in tensors.items():
        assert_packed_equal(p, back.tensors[name])
    back.tensors["plain"].payload[0] ^= 0xFF  # writable, and its own region of the buffer
    assert_packed_equal(tensors["fp16"], back.tensors["fp16"])


def test_decoding_copies_the_payload_once() -> None:
    """Reassembly is the only copy: the decoded payloads add no memory of their own."""
    big = {f"w{i}": quantize(torch.randn(256, 1024), 8) for i in range(4)}  # 1 MiB of payload
    msg = WireMessage.update("c", tensors=big)
    frames = list(message_to_frames(msg, chunk_size=1 << 16))
    size = frames[0].header.payload_size
    tracemalloc.start()
    try:
        back = message_from_frames(frames, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(p.payload.numel() for p in back.tensors.values()) > size * 0.99
    assert peak < 1.5 * size, (peak, size)  # the copying decoder peaked at 2.3x


def test_share_only_for_writable_buffers_the_caller_hands_over() -> None:
    p = quantize(torch.randn(8, 8), 4)
    data = bytearray(bundle_to_bytes({"w": p}))
    shared = bundle_from_bytes(data, LIMITS, share=True)["w"].payload
    copied = bundle_from_bytes(data, LIMITS)["w"].payload
    from_bytes = bundle_from_bytes(bytes(data), LIMITS, share=True)["w"].payload  # read-only
    shared[0] ^= 0xFF
    assert bundle_from_bytes(bytes(data), LIMITS)["w"].payload[0] == shared[0]  # data changed
    assert copied[0] == from_bytes[0] == p.payload[0] != shared[0]
    from_bytes[0] ^= 0xFF  # a private, writable copy
    assert p.payload[0] != from_bytes[0]


def test_split_len_field_keeps_protobuf_semantics() -> None:
    first, last = b"\x01" * 3, b"\x02" * 5
    data = (
        pb.PackedTensor(name="t", axis=1).SerializeToString()
        + encode_len_field(14, len(first))
        + first
        + b"\x70\x07"  # field 14 as a varint: protobuf keeps it as an unknown field
        + encode_len_field(14, len(last))
        + last
        + pb.PackedTensor(row_scales=b"\x00\x3c").SerializeToString()
    )
    rest, payload = split_len_field(memoryview(data), 14, "tensor", {})
    assert payload is not None and bytes(payload) == last  # the last occurrence wins
    whole = pb.PackedTensor.FromString(data)
    assert whole.payload == last
    parsed = pb.PackedTensor.FromString(bytes(rest))
    assert parsed.payload == b""
    parsed.payload = last
    assert parsed == whole
    assert split_len_field(memoryview(b"\x10\x01"), 14, "tensor", {}) == (
        bytearray(b"\x10\x01"),
        None,
    )


def test_repeated_payload_field_decodes_as_protobuf_would(assert_packed_equal) -> None:
    p = quantize(torch.randn(4, 16), 4)
    msg = packed_to_proto(p, "w")
    body = msg.SerializeToString()
    junk = encode_len_field(14, 3) + b"abc"  # an earlier payload, overridden by the real one
    body = junk + body
    data = pb.TensorBundle(format_version=FORMAT_VERSION).SerializeToString()
    data += encode_len_field(2, len(body)) + body
    expected = packed_from_proto(pb.PackedTensor.FromString(body), LIMITS)[1]
    for share in (False, True):
        assert_packed_equal(expected, bundle_from_bytes(bytearray(data), LIMITS, share=share)["w"])


@pytest.mark.parametrize("cut", [1, 5])
def test_corrupt_entry_still_reports_protobufs_error(cut: int) -> None:
    body = packed_to_proto(quantize(torch.randn(4, 16), 4), "w").SerializeToString()[:-cut]
    data = pb.TensorBundle(format_version=FORMAT_VERSION).SerializeToString()
    data += encode_len_field(2, len(body)) + body
    with pytest.raises(ValueError, match="entry 0 is corrupt"):
        bundle_from_bytes(data, LIMITS)
