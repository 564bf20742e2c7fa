"""Counter-based stochastic rounding noise: the torch code is the documented definition, it is
uniform, seeded, and stochastic rounding with it is unbiased."""

from __future__ import annotations

import math
import random

import torch

from fedq.codec import Granularity, QuantSpec, dequantize, quantize
from fedq.codec.noise import counter_uniform, draw_seed

M32 = 0xFFFFFFFF


def _mix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x7FEB352D) & M32
    h ^= h >> 15
    h = (h * 0x5BD1E995) & M32
    return h ^ (h >> 16)


def _spec_u(seed: int, i: int) -> float:
    """The definition in fedq.codec.noise's docstring, on Python ints."""
    h = _mix((i & M32) ^ (seed & M32))
    h = _mix(h ^ (i >> 32) ^ (seed >> 32))
    return (h >> 8) / 2**24


def test_torch_noise_is_the_documented_function() -> None:
    rng = random.Random(0)
    for seed in [
        0,
        1,
        2**32 - 1,
        2**32,
        2**63 + 11,
        2**64 - 1,
        *(rng.getrandbits(64) for _ in range(4)),
    ]:
        idx = [
            0,
            1,
            2,
            2**31 - 1,
            2**31,
            2**32 - 1,
            2**32,
            2**40 + 3,
            *(rng.getrandbits(45) for _ in range(50)),
        ]
        got = counter_uniform(seed, torch.tensor(idx, dtype=torch.int64))
        assert got.dtype == torch.float32
        assert got.tolist() == [_spec_u(seed, i) for i in idx]


def test_noise_is_uniform_and_depends_on_the_seed() -> None:
    u = counter_uniform(12345, torch.arange(1 << 16))
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    expect = (1 << 16) / 16
    assert float(((counts - expect) ** 2 / expect).sum()) < 50  # chi-square, 15 dof: mean 15
    assert abs(float(u.mean()) - 0.5) < 0.01
    v = counter_uniform(12346, torch.arange(1 << 16))
    assert float((u == v).float().mean()) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.02  # neighbours


def test_seeds_are_drawn_from_the_generator() -> None:
    a = draw_seed(torch.Generator().manual_seed(3))
    assert a == draw_seed(torch.Generator().manual_seed(3))
    assert a != draw_seed(torch.Generator().manual_seed(4))
    assert 0 <= a < 2**62


def test_stochastic_rounding_with_a_seed_is_unbiased_and_reproducible() -> None:
    """As ``test_stochastic_rounding_is_unbiased`` for the generator's noise: the mean of 4000
    independently rounded copies is within 5 standard errors of x."""
    n_rows, bits = 4000, 2
    x = torch.randn(64, generator=torch.Generator().manual_seed(3))
    xs = x.expand(n_rows, 64)
    spec = QuantSpec(Granularity.CHANNEL, stochastic=True, scale_dtype="float32")
    p = quantize(xs, bits, spec, seed=77)
    y = dequantize(p)
    scale = float(p.scales[0])
    tol = 5 * math.sqrt(scale**2 / 4 / n_rows)
    assert float((y.mean(dim=0) - x).abs().max()) <= tol
    assert torch.equal(p.payload, quantize(xs, bits, spec, seed=77).payload)
    assert not torch.equal(p.payload, quantize(xs, bits, spec, seed=78).payload)
    # without a seed the CPU path still follows the generator's own stream
    g = quantize(xs, bits, spec, generator=torch.Generator().manual_seed(77))
    assert not torch.equal(g.payload, p.payload)
