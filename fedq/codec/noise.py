"""Counter-based noise for stochastic rounding off the CPU: ``u(seed, i)`` in ``[0, 1)``.

On the CPU, stochastic rounding draws its noise from a ``torch.Generator`` in element order.
That stream cannot be reproduced inside a GPU kernel, so for tensors on any other device the noise
of element ``i`` (its index in the ``[num_blocks, block_len]`` block view, padding included) is a
pure function of a 64-bit seed and ``i``, computed identically by the torch path and the Triton
kernels (``fedq_kernels``), which therefore write the same payload bytes:

    k0, k1 = low and high 32 bits of seed
    h = mix(lo32(i) ^ k0)
    h = mix(h ^ hi32(i) ^ k1)
    u = (h >> 8) * 2**-24

where ``mix`` is the 32-bit xorshift-multiply finaliser ``x ^= x >> 16; x *= 0x7FEB352D;
x ^= x >> 15; x *= 0x5BD1E995; x ^= x >> 16`` (arithmetic mod 2**32). ``mix`` is a bijection, so
over consecutive indices ``u`` takes every multiple of ``2**-24`` equally often: the rounding
stays unbiased. The seed comes from the caller's generator (one draw per tensor), so a seeded
run is reproducible on the GPU too. Only the sender uses the noise; the receiver never needs it.
"""

from __future__ import annotations

import torch

MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x5BD1E995
_MASK32 = 0xFFFFFFFF
#: Seeds drawn from a generator have this many bits (any seed in [0, 2**64) is valid).
SEED_BITS = 62


def _mix(h: torch.Tensor) -> torch.Tensor:
    """The finaliser on int64 tensors holding 32-bit values (products stay below 2**63)."""
    h = h ^ (h >> 16)
    h = (h * MIX_MUL1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * MIX_MUL2) & _MASK32
    return h ^ (h >> 16)


def seed_words(seed: int) -> tuple[int, int]:
    """``(k0, k1)``: the low and high 32 bits of a seed in ``[0, 2**64)``."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"noise seed must be in [0, 2**64), got {seed}")
    return seed & _MASK32, seed >> 32


def counter_uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """float32 ``u(seed, i)`` for every element of the int64 tensor ``index`` (module docstring)."""
    k0, k1 = seed_words(seed)
    h = _mix((index & _MASK32) ^ k0)
    h = _mix(h ^ (index >> 32) ^ k1)
    return (h >> 8).to(torch.float32) * 2.0**-24


def draw_seed(generator: torch.Generator | None, device: torch.device | str | None = None) -> int:
    """One noise seed drawn from ``generator``, or without one from the default generator of
    ``device`` (the CPU's when None), the stream that rounding on that device drew from before."""
    dev = generator.device if generator is not None else torch.device(device or "cpu")
    return int(torch.randint(0, 1 << SEED_BITS, (1,), generator=generator, device=dev))
