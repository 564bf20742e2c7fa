"""What fedq's kernels share: index limits, division by a runtime constant, exact float
conversions and the counter-based noise, each as a host helper or a ``@triton.jit`` function.

- Indices are int32: element indices, output offsets and payload bit offsets stay below
  ``2**31`` for tensors of at most :data:`MAX_NUMEL` elements (the codec dispatches larger ones
  to torch). Dividing an index by a runtime value (a block length, the last dimension) would be a
  long integer-division sequence per element on a GPU; :func:`magic` gives a multiplier and a
  shift that do it in one 64-bit multiply (Granlund and Montgomery's method, exact for every
  dividend below ``2**31``).
- Conversions go through the bits where Triton's interpreter differs from the GPU: its float32 ->
  bfloat16 cast truncates, while torch and the GPU round to nearest even, so
  :func:`from_f32` rounds bfloat16 by hand (the same integer formula as torch's) on both.
- :func:`counter_uniform` is :func:`fedq.codec.noise.counter_uniform` in Triton (same
  constants, same bits; its indices are below ``2**31``, so their high word is zero).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fedq.codec.noise import MIX_MUL1, MIX_MUL2, seed_words
from fedq.errors import CodecError

#: Largest tensor the kernels take: every element index and payload bit offset fits in int32.
MAX_NUMEL = 1 << 28

_MUL1: tl.constexpr = tl.constexpr(MIX_MUL1)
_MUL2: tl.constexpr = tl.constexpr(MIX_MUL2)


def supports(numel: int) -> bool:
    """Whether a tensor of ``numel`` elements is within the kernels' index range."""
    return 0 <= numel <= MAX_NUMEL


def check_device(device: torch.device) -> None:
    """The kernels run on CUDA devices, and on the CPU only under Triton's interpreter."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "") != "1":
        raise CodecError(f"fedq_kernels need a CUDA device (or TRITON_INTERPRET=1), got {device}")


def magic(d: int) -> tuple[int, int]:
    """``(m, s)`` with ``(n * m) >> s == n // d`` for every ``0 <= n < 2**31`` (``d >= 1``):
    ``s = 31 + ceil(log2 d)``, ``m = floor(2**s / d) + 1 <= 2**32``, so ``n * m < 2**63``."""
    if d < 1:
        raise ValueError(f"divisor must be positive, got {d}")
    s = 31 + (d - 1).bit_length()
    return (1 << s) // d + 1, s


def seed_args(seed: int) -> tuple[int, int]:
    """The seed's two 32-bit words as signed int32 values (kernels bitcast them back)."""
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in seed_words(seed))  # type: ignore[return-value]


@triton.jit
def udiv(n, m, s):
    """``n // d`` for int32 ``0 <= n < 2**31``, with ``(m, s) = magic(d)``."""
    return ((n.to(tl.int64) * m) >> s).to(tl.int32)


@triton.jit
def to_f32(x):
    """Exact widening to float32 (bfloat16 through its bits)."""
    if x.dtype == tl.bfloat16:
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def from_f32(v, dtype: tl.constexpr):
    """float32 to ``dtype`` rounding to nearest even (bfloat16 by hand, as torch does it)."""
    if dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        y = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = v.to(dtype)
    return y


@triton.jit
def round_half_even(v):
    """``torch.round`` for float32: nearest integer, ties to even. Exact for ``v >= 0`` (where
    the fraction ``v - floor(v)`` is exact); negative values are clamped to 0 by the caller."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _mix32(h):
    h ^= h >> 16
    h *= _MUL1
    h ^= h >> 15
    h *= _MUL2
    h ^= h >> 16
    return h


@triton.jit
def counter_uniform(index, k0, k1):
    """float32 noise in ``[0, 1)`` for int32 ``index >= 0``; ``k0``/``k1`` from
    :func:`seed_args`."""
    h = _mix32(index.to(tl.uint32) ^ k0.to(tl.uint32, bitcast=True))
    h = _mix32(h ^ k1.to(tl.uint32, bitcast=True))
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
