"""The kernels' building blocks against their definitions: division by a magic number, the
counter-based noise (Triton == torch, bit for bit), round half to even and the float casts."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="fedq_kernels need triton (pip install fedq[kernels])"
)
tl = pytest.importorskip("triton.language")

from fedq_kernels.common import (  # noqa: E402
    counter_uniform,
    from_f32,
    magic,
    round_half_even,
    seed_args,
    to_f32,
    udiv,
)

from fedq.codec.noise import counter_uniform as torch_noise  # noqa: E402

Same = Callable[[torch.Tensor, torch.Tensor], bool]


@triton.jit
def _udiv_kernel(n_ptr, out_ptr, size, m, s, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < size
    n = tl.load(n_ptr + i, mask=mask, other=0)
    tl.store(out_ptr + i, udiv(n, m, s), mask=mask)


@triton.jit(do_not_specialize=["k0", "k1"])
def _noise_kernel(idx_ptr, out_ptr, size, k0, k1, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < size
    idx = tl.load(idx_ptr + i, mask=mask, other=0)
    tl.store(out_ptr + i, counter_uniform(idx, k0, k1), mask=mask)


@triton.jit
def _round_kernel(v_ptr, out_ptr, size, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < size
    tl.store(out_ptr + i, round_half_even(tl.load(v_ptr + i, mask=mask, other=0.0)), mask=mask)


@triton.jit
def _cast_kernel(v_ptr, out_ptr, back_ptr, size, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < size
    y = from_f32(tl.load(v_ptr + i, mask=mask, other=0.0), out_ptr.dtype.element_ty)
    tl.store(out_ptr + i, y, mask=mask)
    tl.store(back_ptr + i, to_f32(y), mask=mask)


def _pow2(n: int) -> int:
    return int(triton.next_power_of_2(max(n, 1)))


def test_magic_numbers_divide_exactly() -> None:
    rng = random.Random(0)
    divisors = [*range(1, 70), 96, 127, 128, 129, 384, 1000, 4096, 65535, 65536, 1 << 20]
    divisors += [rng.randrange(1, 1 << 31) for _ in range(30)] + [(1 << 31) - 1]
    top = (1 << 31) - 1
    for d in divisors:
        m, s = magic(d)
        assert m <= 1 << 32 and top * m < 1 << 63
        ns = [0, 1, d - 1, d, d + 1, 2 * d - 1, top, top - 1, top - top % d, top - top % d - 1]
        ns += [rng.randrange(0, 1 << 31) for _ in range(200)]
        for n in ns:
            if 0 <= n <= top:
                assert (n * m) >> s == n // d, (n, d)
    with pytest.raises(ValueError):
        magic(0)


def test_udiv_in_a_kernel_matches_floor_division() -> None:
    n = torch.tensor([0, 1, 5, 383, 384, 385, 1000003, 2**31 - 1, 2**30], dtype=torch.int32)
    out = torch.empty_like(n)
    for d in (1, 3, 7, 384, 4096, 1000003, 2**31 - 1):
        m, s = magic(d)
        _udiv_kernel[(1,)](n, out, n.numel(), m, s, BLOCK=_pow2(n.numel()))
        assert torch.equal(out, n // d), d


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF, 2**40 + 17, 2**63 + 5, 2**64 - 1])
def test_counter_noise_is_the_same_in_triton_and_torch(seed: int, bits_equal: Same) -> None:
    g = torch.Generator().manual_seed(seed % 1000)
    idx = torch.cat([torch.arange(300), torch.randint(0, 2**31 - 1, (212,), generator=g)])
    out = torch.empty(idx.numel(), dtype=torch.float32)
    k0, k1 = seed_args(seed)
    _noise_kernel[(1,)](idx.to(torch.int32), out, idx.numel(), k0, k1, BLOCK=512)
    ref = torch_noise(seed, idx)
    assert bits_equal(out, ref)
    assert float(ref.min()) >= 0.0 and float(ref.max()) < 1.0
    assert bool(((ref * 2**24) == (ref * 2**24).floor()).all())  # multiples of 2**-24


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy: inf - inf
def test_round_half_even_matches_torch_round_on_non_negatives(bits_equal: Same) -> None:
    ties = torch.arange(0, 300, dtype=torch.float32) + 0.5
    eps = torch.tensor([2.0**-25, 2.0**-24, 1e-7])
    edge = torch.cat([0.5 - eps, 0.5 + eps, 1.5 - eps, 2.5 + eps, torch.tensor([0.0, 1.0])])
    big = torch.tensor([2.0**22 + 0.5, 2.0**23 - 0.5, 2.0**23 + 1, 2.0**24 + 2, 3e38, float("inf")])
    rnd = torch.rand(600, generator=torch.Generator().manual_seed(1)) * 300
    v = torch.cat([ties, edge, big, rnd])
    out = torch.empty_like(v)
    _round_kernel[(1,)](v, out, v.numel(), BLOCK=_pow2(v.numel()))
    assert bits_equal(out, torch.round(v))


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # numpy: to float16 infinity
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_float_casts_round_to_nearest_even_as_torch(dtype: torch.dtype, bits_equal: Same) -> None:
    g = torch.Generator().manual_seed(2)
    raw = torch.randint(-(2**31), 2**31 - 1, (3000,), generator=g, dtype=torch.int64)
    v = raw.to(torch.int32).view(torch.float32)
    v = v[torch.isfinite(v)]
    base = torch.randn(500, generator=g).to(dtype).float()  # ties halfway between neighbours
    up = torch.nextafter(base.to(dtype), torch.full_like(base, float("inf")).to(dtype)).float()
    v = torch.cat([v, (base + up) / 2, base, torch.randn(500, generator=g) * 1e-6]).contiguous()
    out = torch.empty(v.numel(), dtype=dtype)
    back = torch.empty_like(v)
    _cast_kernel[(1,)](v, out, back, v.numel(), BLOCK=_pow2(v.numel()))
    assert bits_equal(out, v.to(dtype))
    assert bits_equal(back, v.to(dtype).float())
