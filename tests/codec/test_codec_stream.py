"""Streaming decode (torch path): feeding the payload in chunks cut anywhere (inside codes, at run
boundaries, one byte at a time) gives exactly ``dequantize`` of the whole tensor, and every code
is decoded as soon as the bytes that hold it (and the rest of its byte group) have arrived."""

from __future__ import annotations

import random

import pytest
import torch

from fedq.codec import Granularity, QuantSpec, dequantize, quantize, raw
from fedq.codec.packed import PackedTensor
from fedq.codec.runs import payload_runs
from fedq.codec.stream import StreamDecoder
from fedq.errors import CodecError


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _cuts(p: PackedTensor, rng: random.Random) -> list[int]:
    """Chunk ends: random sizes 1-9 bytes, plus every run boundary and a byte in each run's
    middle (odd widths: inside a code)."""
    total = p.payload.numel()
    ends = set()
    pos = 0
    while pos < total:
        pos = min(total, pos + rng.randint(1, 9))
        ends.add(pos)
    if p.bits.numel():
        for run in payload_runs(p.layout, p.bits):
            ends.update({run.byte_start, run.byte_start + run.nbytes // 2})
    return sorted(e for e in ends if 0 < e <= total)


def stream(p: PackedTensor, rng: random.Random, as_tensor: bool = False) -> torch.Tensor:
    d = StreamDecoder(p)
    prev, decoded = 0, 0
    for end in _cuts(p, rng):
        piece = p.payload[prev:end]
        now = d.feed(piece if as_tensor else bytes(piece.tolist()))
        assert now >= decoded  # monotone: nothing decoded twice or taken back
        decoded, prev = now, end
    assert d.received == p.payload.numel()
    return d.finish(p.row_scales, p.outlier_index, p.outlier_values)


def _cases() -> list[tuple[tuple[int, ...], QuantSpec, int | str]]:
    return [
        ((6, 7, 5), QuantSpec(), 3),
        ((6, 7, 5), QuantSpec(axis=-1), "mixed"),
        ((6, 7, 5), QuantSpec(axis=1, symmetric=True), "mixed"),
        ((1001,), QuantSpec(Granularity.GROUP, group_size=64), "mixed"),
        ((13, 11), QuantSpec(Granularity.GROUP, group_size=5, symmetric=True), 7),
        (
            (4, 16, 24),
            QuantSpec(axis=-1, row_scale=True, range="sigma", outlier_ratio=3.0),
            "mixed",
        ),
        ((30,), QuantSpec(Granularity.TENSOR), 1),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunked_decode_equals_the_whole_decode(dtype: torch.dtype) -> None:
    rng = random.Random(0)
    for shape, spec, bits in _cases():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
        if len(shape) == 3 and shape[0] == 4:
            x[:, 0] *= 40.0  # outlier rows
        nb = spec.layout_for(shape, bit_map=True).num_blocks
        bm = torch.tensor([rng.randint(1, 8) for _ in range(nb)], dtype=torch.uint8)
        p = quantize(x.to(dtype), bm if bits == "mixed" else bits, spec)
        for trial in range(3):
            assert _same(stream(p, rng, as_tensor=trial == 2), dequantize(p)), (shape, spec)


def test_codes_are_decoded_as_their_bytes_arrive() -> None:
    """Byte by byte: after each byte the torch path has decoded, in every run, the codes of all
    the complete 8-code groups it holds (and the whole run once its last byte is in)."""
    x = torch.randn(10, 9, generator=torch.Generator().manual_seed(2))
    bm = torch.tensor([1, 3, 3, 5, 8, 2, 7, 3, 6, 5], dtype=torch.uint8)
    p = quantize(x, bm, QuantSpec())
    runs = payload_runs(p.layout, p.bits)
    d = StreamDecoder(p)
    for k in range(p.payload.numel()):
        got = d.feed(bytes([int(p.payload[k])]))
        want = 0
        for run in runs:
            avail = max(0, (k + 1 - run.byte_start) * 8 // run.bits)
            want += run.numel if avail >= run.numel else avail - avail % 8
        assert got == want == d.decoded, k
    assert d.decoded == p.numel
    assert _same(d.finish(), dequantize(p))


def test_raw_tensors_stream_into_the_output() -> None:
    x = torch.randn(5, 7).to(torch.bfloat16)
    p = raw(x)
    d = StreamDecoder(p)
    d.feed(bytes(p.payload[:5].tolist()))
    assert d.decoded == 2
    d.feed(p.payload[5:])
    assert torch.equal(d.finish(), x)


def test_empty_tensors_finish_at_once() -> None:
    p = quantize(torch.empty(0, 4), 3)
    d = StreamDecoder(p)
    assert d.feed(b"") == 0
    y = d.finish()
    assert y.shape == (0, 4) and y.dtype == torch.float32


def test_misuse_is_a_codec_error() -> None:
    p = quantize(torch.randn(4, 20), 3, QuantSpec(axis=-1, row_scale=True))
    d = StreamDecoder(p)
    with pytest.raises(CodecError, match="received"):
        d.finish()
    with pytest.raises(CodecError, match="exceeds"):
        d.feed(bytes(p.payload.numel() + 1))
    d.feed(p.payload)
    with pytest.raises(CodecError, match="row_scales"):
        d.finish(row_scales=torch.ones(3, dtype=torch.float16))
    with pytest.raises(CodecError, match="together"):
        d.finish(outlier_index=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(CodecError, match="uint8"):
        StreamDecoder(p).feed(torch.zeros(3))
