"""The kernels compiled for a CUDA device (``TRITON_INTERPRET=0 python -m pytest -m gpu
tests/kernels``): bit-identical to the torch path on the same GPU, with tensors large enough for
many programs per run. Skipped without a CUDA device or under the interpreter."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton", reason="fedq_kernels need triton (pip install fedq[kernels])")

import fedq_kernels

from fedq.codec import Granularity, QuantSpec, dequantize, dispatch, quantize
from fedq.codec.stream import StreamDecoder

Same = Callable[[torch.Tensor, torch.Tensor], bool]
pytestmark = pytest.mark.gpu
SPECS = [
    QuantSpec(),
    QuantSpec(axis=-1, symmetric=True),
    QuantSpec(axis=1, range="mse", scale_dtype="float32"),
    QuantSpec(Granularity.GROUP, group_size=100),
    QuantSpec(Granularity.TENSOR),
    QuantSpec(axis=-1, row_scale=True, range="sigma", outlier_ratio=3.0),
]


def _x(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(8, 300, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x[:, 0] *= 40.0
    return x.to(dtype).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_codec_on_the_gpu_is_bit_identical_to_the_torch_path(
    dtype: torch.dtype, stochastic: bool, bits_equal: Same
) -> None:
    assert dispatch.kernels_for(torch.device("cuda"), 1000) is fedq_kernels
    x = _x(dtype)
    rng = random.Random(0)
    for base in SPECS:
        spec = dataclasses.replace(base, stochastic=stochastic)
        nb = spec.layout_for(tuple(x.shape), bit_map=True).num_blocks
        mixed = torch.tensor([rng.randint(1, 8) for _ in range(nb)], dtype=torch.uint8)
        for bits in [*range(1, 9), mixed]:
            p = quantize(x, bits, spec, seed=11)
            with dispatch.torch_only():
                q = quantize(x, bits, spec, seed=11)
                want = dequantize(q, device="cuda")
            assert torch.equal(p.payload, q.payload) and torch.equal(p.scales, q.scales)
            assert bits_equal(dequantize(p, device="cuda"), want.contiguous())


def test_subnormal_values_and_scales_match_the_torch_path(bits_equal: Same) -> None:
    """float32 scales and values down in the subnormal range: a kernel that flushed subnormals
    to zero would differ here."""
    x = _x(torch.float32)[:2] * 1e-39
    for spec in (
        QuantSpec(scale_dtype="float32"),
        QuantSpec(symmetric=True, scale_dtype="float32"),
    ):
        for bits in (2, 5, 8):
            p = quantize(x, bits, spec)
            with dispatch.torch_only():
                q = quantize(x, bits, spec)
                want = dequantize(q, device="cuda")
            assert torch.equal(p.payload, q.payload)
            assert bits_equal(dequantize(p, device="cuda"), want.contiguous())


def test_streaming_on_the_gpu_equals_the_whole_decode(bits_equal: Same) -> None:
    x = _x(torch.float32)
    spec = SPECS[-1]
    nb = spec.layout_for(tuple(x.shape), bit_map=True).num_blocks
    bm = torch.randint(1, 9, (nb,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    p = quantize(x, bm, spec)
    d = StreamDecoder(p, device="cuda")
    assert d.uses_kernels
    rng = random.Random(2)
    pos = 0
    while pos < p.payload.numel():
        step = rng.randint(1, 40000)
        d.feed(p.payload[pos : pos + step])
        pos += step
    with dispatch.torch_only():
        want = dequantize(p, device="cuda")
    assert bits_equal(d.finish(p.row_scales, p.outlier_index, p.outlier_values), want.contiguous())
