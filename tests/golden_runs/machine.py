"""Which machine a golden run was recorded on: the same scenario gives the same bits on the same
CPU and torch build, but another CPU (another vector unit, another BLAS kernel) rounds floats
differently in their last bits."""

from __future__ import annotations

import platform
from pathlib import Path

#: CPU features that change which float kernels torch runs.
FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_signature() -> str:
    """``<cpu model> | <vector flags> | torch <version>``, e.g. ``AMD EPYC | avx avx2 fma |
    torch 2.13.0+cpu``."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if model and flags:
                break
    have = " ".join(f for f in FLAGS if f in flags)
    return f"{model} | {have} | torch {torch.__version__}"
