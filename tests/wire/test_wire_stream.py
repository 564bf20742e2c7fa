"""Decoding a message's tensors while its chunks arrive: the same tensors as reading the whole
message and decoding it, for any chunk size; tensors decode before the message ends; the same
frame and field checks, and fedq's field order is required."""

from __future__ import annotations

import pytest
import torch

from fedq.codec import Granularity, PackedTensor, QuantSpec, dequantize, quantize, raw
from fedq.errors import WireFormatError
from fedq.wire import WireLimits, WireMessage, bundle_to_bytes, message_to_frames, read_message
from fedq.wire.pb import tensor_pb2 as pb
from fedq.wire.protowire import encode_len_field, encode_varint
from fedq.wire.stream import BundleDecoder, read_message_streaming

LIMITS = WireLimits()


def _tensors() -> dict[str, PackedTensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 24, generator=g)
    x[:, 0] *= 40.0
    bm = torch.randint(1, 9, (24,), generator=g, dtype=torch.uint8)
    return {
        "act": quantize(
            x, bm, QuantSpec(axis=-1, row_scale=True, range="sigma", outlier_ratio=3.0)
        ),
        "w": quantize(torch.randn(64, 40, generator=g), 3, QuantSpec()),
        "g": quantize(
            torch.randn(1001, generator=g).to(torch.bfloat16),
            5,
            QuantSpec(Granularity.GROUP, group_size=64, symmetric=True),
        ),
        "bias": raw(torch.randn(7, generator=g).half()),
        "empty": quantize(torch.empty(0, 3), 4),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096])
def test_streamed_tensors_equal_the_whole_message_decoded(chunk: int) -> None:
    msg = WireMessage.update("c1", 3, tensors=_tensors(), scalars={"n": 5.0})
    frames = list(message_to_frames(msg, chunk_size=chunk))
    got = read_message_streaming(iter(frames), LIMITS)
    assert got is not None
    head, tensors = got
    whole = read_message(iter(frames), LIMITS)
    assert whole is not None
    assert (head.kind, head.client_id, head.round, head.scalars) == ("update", "c1", 3, {"n": 5.0})
    assert head.tensors == {} and list(tensors) == list(whole.tensors)
    for name, p in whole.tensors.items():
        assert _same(tensors[name], dequantize(p)), name


def test_a_tensor_is_decoded_before_the_message_ends() -> None:
    tensors = {"w": quantize(torch.randn(256, 64), 4, QuantSpec())}
    data = bundle_to_bytes(tensors)
    bundle = BundleDecoder(LIMITS)
    bundle.feed(data[: len(data) // 2])
    assert bundle.current is not None and bundle.current.decoder is not None
    assert bundle.current.decoder.decoded > 0  # codes decoded from the first half already
    bundle.feed(data[len(data) // 2 :])
    assert _same(bundle.finish()["w"], dequantize(tensors["w"]))


def test_messages_without_tensors_and_clean_ends() -> None:
    frames = list(message_to_frames(WireMessage.failed("c1", 0, "no data")))
    got = read_message_streaming(iter(frames), LIMITS)
    assert got is not None and got[1] == {}
    assert read_message_streaming(iter([]), LIMITS) is None


def _bundle(*fields: bytes) -> bytes:
    return b"".join(fields)


def _tensor_field(msg: pb.PackedTensor) -> bytes:
    body = msg.SerializeToString()
    return encode_len_field(2, len(body)) + body


def test_bad_bundles_are_wire_format_errors() -> None:
    from fedq.wire.serde import packed_to_proto

    good = packed_to_proto(quantize(torch.randn(8, 20), 3, QuantSpec(row_scale=True)), "w")
    version = encode_varint(1 << 3) + encode_varint(3)

    def fails(data: bytes, match: str) -> None:
        with pytest.raises(WireFormatError, match=match):
            b = BundleDecoder(LIMITS)
            b.feed(data)
            b.finish()

    fails(_tensor_field(good) + version, "must come before")
    fails(encode_varint(1 << 3) + encode_varint(2) + _tensor_field(good), "unsupported version")
    fails(version + _tensor_field(good)[:-3], "truncated")
    fails(version + _tensor_field(good) * 2, "duplicate name")
    bad = pb.PackedTensor()
    bad.CopyFrom(good)
    bad.payload = bad.payload[:-1]
    fails(version + _tensor_field(bad), "payload")
    body = good.SerializeToString()
    late = body + pb.PackedTensor(axis=1).SerializeToString()  # a header field after the payload
    fails(version + encode_len_field(2, len(late)) + late, "follows the payload")
    fails(version + encode_varint((2 << 3) | 0) + encode_varint(5), "wrong wire type")
    with pytest.raises(WireFormatError, match="exceeds limit"):
        BundleDecoder(WireLimits(max_payload_bytes=10)).feed(version + _tensor_field(good))
    plain = _bundle(version, _tensor_field(good))
    b = BundleDecoder(LIMITS)
    b.feed(plain)
    assert set(b.finish()) == {"w"}
