"""Dispatch rules that hold without triton: CPU tensors always take the torch path, a CUDA tensor
needs a CUDA device, ``FEDQ_KERNELS=0`` and ``torch_only`` turn the kernels off, and fedq never
imports triton (or fedq_kernels) unless a tensor goes to the kernels."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fedq.codec import dispatch


def test_cpu_tensors_take_the_torch_path() -> None:
    assert dispatch.kernels_for(torch.device("cpu"), 100) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the rule without a GPU")
def test_cuda_tensors_need_a_cuda_device() -> None:
    assert dispatch.kernels_for(torch.device("cuda"), 100) is None


def test_cuda_tensors_skip_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = SimpleNamespace(supports=lambda n: True)  # stands in for fedq_kernels
    monkeypatch.setattr(dispatch, "kernels", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.kernels_for(torch.device("cuda"), 100) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.kernels_for(torch.device("cuda"), 100) is fake


def test_switches_turn_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = SimpleNamespace(supports=lambda n: n < 10)  # stands in for fedq_kernels
    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(dispatch, "kernels", lambda: fake)
    cpu = torch.device("cpu")
    assert dispatch.kernels_for(cpu, 5) is fake
    assert dispatch.kernels_for(cpu, 50) is None  # beyond the kernels' range
    with dispatch.torch_only():
        with dispatch.torch_only():
            assert dispatch.kernels_for(cpu, 5) is None
        assert dispatch.kernels_for(cpu, 5) is None
    assert dispatch.kernels_for(cpu, 5) is not None
    monkeypatch.setenv(dispatch.ENV_VAR, "0")
    assert dispatch.kernels_for(cpu, 5) is None


def test_coding_on_the_cpu_never_imports_triton() -> None:
    code = (
        "import sys, torch, fedq, fedq.codec as c\n"
        "p = c.quantize(torch.randn(8, 40), 3, c.QuantSpec(stochastic=True))\n"
        "c.dequantize(p)\n"
        "from fedq.codec.stream import StreamDecoder\n"
        "d = StreamDecoder(p); d.feed(p.payload); d.finish()\n"
        "print(','.join(m for m in ('triton', 'fedq_kernels') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
