"""Which path codes a tensor: the Triton kernels of ``fedq_kernels`` or the codec's torch maths.

Rules, checked on every call (:func:`kernels_for`); the kernels are used only if all hold:

1. the tensor's device type is in :data:`KERNEL_DEVICES` (``cuda``; tests add ``cpu`` to run
   the kernels under ``TRITON_INTERPRET=1``) and, for ``cuda``, torch sees a CUDA device and
   Triton compiles for it (``TRITON_INTERPRET`` is not ``1``: the interpreter is for tests on
   CPU tensors, and would make a GPU run crawl);
2. the environment variable ``FEDQ_KERNELS`` is not ``0`` and no :func:`torch_only` block is
   active (benchmarks use it to time the torch path on the same GPU);
3. ``import fedq_kernels`` works (triton installed; the import happens here, on first use, so
   ``import fedq`` never loads triton);
4. the tensor is within the kernels' index range (``fedq_kernels.supports(numel)``).

Everything else, CPU tensors above all, takes the torch path, whose results do not depend on
whether triton is installed. The kernels are bit-identical to the torch path (their tests check
it), so the choice changes speed, never bytes or values.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

ENV_VAR = "FEDQ_KERNELS"
#: Device types whose tensors go to the kernels.
KERNEL_DEVICES: frozenset[str] = frozenset({"cuda"})

_torch_only_depth = 0
_module: ModuleType | None = None
_import_failed = False


def kernels() -> ModuleType | None:
    """The ``fedq_kernels`` package, imported on first use; None where it cannot be imported."""
    global _module, _import_failed
    if _module is None and not _import_failed:
        try:
            _module = importlib.import_module("fedq_kernels")
        except ImportError:
            _import_failed = True
    return _module


def kernels_for(device: torch.device, numel: int) -> ModuleType | None:
    """The kernel package if a tensor of ``numel`` elements on ``device`` goes to the kernels
    (module docstring), else None."""
    if device.type not in KERNEL_DEVICES or _torch_only_depth:
        return None
    if os.environ.get(ENV_VAR, "").strip() == "0":
        return None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "") == "1"
    ):
        return None
    mod = kernels()
    if mod is None or not mod.supports(numel):
        return None
    return mod


@contextmanager
def torch_only() -> Iterator[None]:
    """Inside this block every tensor takes the torch path."""
    global _torch_only_depth
    _torch_only_depth += 1
    try:
        yield
    finally:
        _torch_only_depth -= 1
