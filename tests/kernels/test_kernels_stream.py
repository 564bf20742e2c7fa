"""Streaming decode through the kernels (``decode_range`` per newly complete range of codes):
chunked == whole, for chunks cut anywhere, and every code decoded as soon as its last bit is in."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton", reason="fedq_kernels need triton (pip install fedq[kernels])")

from fedq.codec import Granularity, QuantSpec, dequantize, dispatch, quantize
from fedq.codec.runs import payload_runs
from fedq.codec.stream import StreamDecoder
from fedq.wire import WireLimits, WireMessage, message_to_frames, read_message_streaming

Same = Callable[[torch.Tensor, torch.Tensor], bool]
pytestmark = pytest.mark.usefixtures("cpu_kernels")


def test_stream_decoder_uses_the_kernels() -> None:
    assert StreamDecoder(quantize(torch.randn(4, 20), 3)).uses_kernels
    with dispatch.torch_only():
        assert not StreamDecoder(quantize(torch.randn(4, 20), 3)).uses_kernels


@pytest.mark.parametrize(
    ("shape", "spec"),
    [
        ((6, 7, 5), QuantSpec(axis=-1)),
        ((6, 7, 5), QuantSpec(axis=1, symmetric=True)),
        ((1001,), QuantSpec(Granularity.GROUP, group_size=64)),
        ((4, 16, 24), QuantSpec(axis=-1, row_scale=True, range="sigma", outlier_ratio=3.0)),
    ],
    ids=["ch-last", "ch-mid", "grp", "rows"],
)
def test_chunked_decode_equals_the_whole_decode(
    shape: tuple[int, ...], spec: QuantSpec, bits_equal: Same
) -> None:
    rng = random.Random(3)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    if len(shape) == 3 and shape[0] == 4:
        x[:, 0] *= 40.0
    nb = spec.layout_for(shape, bit_map=True).num_blocks
    bm = torch.tensor([rng.randint(1, 8) for _ in range(nb)], dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        p = quantize(x.to(dtype), bm, spec)
        runs = payload_runs(p.layout, p.bits)
        cuts = {r.byte_start for r in runs} | {r.byte_start + r.nbytes // 2 for r in runs}
        pos = 0
        while pos < p.payload.numel():
            pos += rng.randint(1, 13)
            cuts.add(min(pos, p.payload.numel()))
        d = StreamDecoder(p)
        prev = 0
        for end in sorted(c for c in cuts if c > 0):
            got = d.feed(p.payload[prev:end])
            prev = end
            # any complete code is decoded at once (no 8-code groups on the kernel path)
            assert got == sum(
                min(r.numel, max(0, (end - r.byte_start) * 8 // r.bits)) for r in runs
            )
        y = d.finish(p.row_scales, p.outlier_index, p.outlier_values)
        with dispatch.torch_only():
            assert bits_equal(y, dequantize(p).contiguous())


def test_wire_streaming_decodes_through_the_kernels(bits_equal: Same) -> None:
    x = torch.randn(4, 16, 24, generator=torch.Generator().manual_seed(2))
    x[:, 0] *= 40.0
    spec = QuantSpec(axis=-1, row_scale=True, range="sigma", outlier_ratio=3.0)
    msg = WireMessage.activations("c", tensors={"h": quantize(x, 3, spec)})
    frames = list(message_to_frames(msg, chunk_size=97))
    got = read_message_streaming(iter(frames), WireLimits())
    assert got is not None
    with dispatch.torch_only():
        want = dequantize(msg.tensors["h"])
    assert bits_equal(got[1]["h"], want.contiguous())
