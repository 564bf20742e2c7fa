"""``fedq.codec`` routed through the kernels (CPU tensors dispatched as CUDA ones are, under the
interpreter): the same values and bytes as the torch path, for the codec, the compressors and
AMAQ's fake quantization, and seeded stochastic rounding stays reproducible."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton", reason="fedq_kernels need triton (pip install fedq[kernels])")

import fedq_kernels

from fedq.adapt.amaq import AmaqQuantizer
from fedq.codec import QuantCompressor, QuantSpec, dequantize, dispatch, quantize

Same = Callable[[torch.Tensor, torch.Tensor], bool]
pytestmark = pytest.mark.usefixtures("cpu_kernels")


def test_the_codec_dispatches_to_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert dispatch.kernels_for(cpu, 1000) is fedq_kernels
    assert dispatch.kernels_for(cpu, fedq_kernels.MAX_NUMEL + 1) is None
    monkeypatch.setenv("FEDQ_KERNELS", "0")
    assert dispatch.kernels_for(cpu, 1000) is None


def test_dequantize_through_the_kernels_matches_the_torch_path(bits_equal: Same) -> None:
    x = torch.randn(4, 16, 24, generator=torch.Generator().manual_seed(0))
    x[:, 0] *= 40.0
    for spec in (QuantSpec(), QuantSpec(axis=-1, row_scale=True, outlier_ratio=3.0, range="mse")):
        with dispatch.torch_only():
            p = quantize(x, 3, spec)
            want = dequantize(p)
        assert bits_equal(dequantize(p), want.contiguous())


def test_compressor_seeds_its_noise_from_its_generator() -> None:
    x = torch.randn(12, 40, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(stochastic=True)
    a = QuantCompressor(spec, seed=3).compress("w", x, 2)
    b = QuantCompressor(spec, seed=3).compress("w", x, 2)
    c = QuantCompressor(spec, seed=4).compress("w", x, 2)
    assert torch.equal(a.payload, b.payload) and not torch.equal(a.payload, c.payload)


def test_amaq_fake_quant_is_the_decoded_tensor_on_the_kernel_path(bits_equal: Same) -> None:
    torch.manual_seed(0)
    q = AmaqQuantizer(
        24,
        init_bits=3.5,
        quant_range="mse",
        row_scale=True,
        outlier_ratio=3.0,
        stochastic=True,
        seed=5,
    )
    x = torch.randn(4, 16, 24, requires_grad=True)
    y, p = q.forward_encode(x)
    with dispatch.torch_only():
        ref = dequantize(p)
    assert bits_equal(y.detach(), ref.contiguous())
    y.sum().backward()
    assert q.gate.grad is not None and bool(torch.isfinite(q.gate.grad).all())
