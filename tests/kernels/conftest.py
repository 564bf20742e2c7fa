"""Shared set-up of the kernel tests. They run the kernels on CPU tensors through Triton's
interpreter (``TRITON_INTERPRET=1``, set by the top-level conftest before anything imports
triton); the ``gpu`` tests compile them for a CUDA device instead and need
``TRITON_INTERPRET=0 python -m pytest -m gpu tests/kernels`` on a machine with one."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from fedq.codec import dispatch


@pytest.fixture(autouse=True)
def _where_kernels_run(request: pytest.FixtureRequest) -> None:
    interpreting = os.environ.get("TRITON_INTERPRET", "") == "1"
    if request.node.get_closest_marker("gpu"):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        if interpreting:
            pytest.skip("compiles the kernels for the GPU: run with TRITON_INTERPRET=0")
    elif not interpreting:
        pytest.skip("runs the kernels on CPU tensors: needs TRITON_INTERPRET=1")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern of every element (so -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


@pytest.fixture
def bits_equal() -> Callable[[torch.Tensor, torch.Tensor], bool]:
    return same_bits


@pytest.fixture
def cpu_kernels() -> Iterator[None]:
    """``fedq.codec`` dispatches CPU tensors to the kernels, as it does CUDA tensors."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dispatch, "KERNEL_DEVICES", frozenset({"cuda", "cpu"}))
        yield
