"""Fused quantize + pack under the interpreter: the same payload bytes as the codec's torch path,
round to nearest and stochastic (counter-based noise), every width, mixed maps, every cut,
half-precision inputs, rounding ties and clamping; and through ``fedq.codec.quantize``."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton", reason="fedq_kernels need triton (pip install fedq[kernels])")

import fedq_kernels

from fedq.codec import Granularity, QuantSpec, dispatch, quantize
from fedq.codec.layout import BlockLayout
from fedq.codec.packed import PackedTensor
from fedq.errors import CodecError

Same = Callable[[torch.Tensor, torch.Tensor], bool]
LAYOUTS = [
    BlockLayout.build((13, 11), Granularity.GROUP, group_size=16),  # partial last group
    BlockLayout.build((9, 20), Granularity.CHANNEL, axis=0),
    BlockLayout.build((150,), Granularity.TENSOR),
]


def _inputs(
    layout: BlockLayout, bm: torch.Tensor, symmetric: bool, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xb = layout.to_blocks((torch.randn(layout.shape, generator=g) * 3).to(dtype))
    levels = (2 ** bm.to(torch.int32) - 1).float()
    divisor = torch.rand(layout.num_blocks, generator=g) * 0.7 + 0.05
    centre = levels / 2 if symmetric else torch.randn(layout.num_blocks, generator=g) - 1
    return xb, divisor, centre


@pytest.mark.parametrize("layout", LAYOUTS, ids=["grp", "ch0", "tensor"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("seed", [None, 2**40 + 3], ids=["rtn", "stochastic"])
def test_every_width_packs_the_same_bytes(
    layout: BlockLayout, symmetric: bool, seed: int | None
) -> None:
    for b in range(1, 9):
        bm = torch.full((layout.num_blocks,), b, dtype=torch.uint8)
        dtype = [torch.float32, torch.float16, torch.bfloat16][b % 3]
        xb, div, centre = _inputs(layout, bm, symmetric, dtype, b)
        got = fedq_kernels.quantize_pack(
            xb, bm, layout, div, centre, symmetric=symmetric, seed=seed
        )
        want = fedq_kernels.quantize_pack_ref(
            xb, bm, layout, div, centre, symmetric=symmetric, seed=seed
        )
        assert torch.equal(got, want), (b, dtype)


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=["grp", "ch0"])
@pytest.mark.parametrize("seed", [None, 5], ids=["rtn", "stochastic"])
def test_mixed_maps_pack_the_same_bytes(layout: BlockLayout, seed: int | None) -> None:
    for case in range(4):
        g = torch.Generator().manual_seed(case)
        bm = torch.randint(1, 9, (layout.num_blocks,), generator=g, dtype=torch.uint8)
        bm[-1] = 5
        for symmetric in (False, True):
            xb, div, centre = _inputs(layout, bm, symmetric, torch.float32, case)
            got = fedq_kernels.quantize_pack(
                xb, bm, layout, div, centre, symmetric=symmetric, seed=seed
            )
            want = fedq_kernels.quantize_pack_ref(
                xb, bm, layout, div, centre, symmetric=symmetric, seed=seed
            )
            assert torch.equal(got, want), (case, symmetric)


def test_rounding_ties_and_clamping_match_torch() -> None:
    """Exact halves round to even, values just below a half round down, values outside the
    range clamp to the end codes."""
    ties = torch.arange(-3, 20, dtype=torch.float32) + 0.5
    edges = torch.tensor([0.5 - 2.0**-25, 0.5 + 2.0**-24, 2.5 - 2.0**-22, -0.5, -1e30, 1e30, 0.0])
    x = torch.cat([ties, edges, torch.linspace(-2.0, 18.0, 34)])  # 64 values
    layout = BlockLayout.build((4, 16), Granularity.CHANNEL, axis=0)
    xb = layout.to_blocks(x.view(4, 16))
    for b in (1, 3, 4, 8):
        bm = torch.full((4,), b, dtype=torch.uint8)
        div, zero = torch.ones(4), torch.zeros(4)
        got = fedq_kernels.quantize_pack(xb, bm, layout, div, zero, symmetric=False)
        want = fedq_kernels.quantize_pack_ref(xb, bm, layout, div, zero, symmetric=False)
        assert torch.equal(got, want), b


def _codec_cases() -> list[tuple[tuple[int, ...], QuantSpec, int | str]]:
    return [
        ((6, 7, 5), QuantSpec(), 3),
        ((6, 7, 5), QuantSpec(axis=-1, symmetric=True), 2),
        ((6, 7, 5), QuantSpec(axis=1, range="mse"), "mixed"),
        (
            (4, 16, 24),
            QuantSpec(axis=-1, row_scale=True, range="sigma", outlier_ratio=3.0),
            "mixed",
        ),
        ((1001,), QuantSpec(Granularity.GROUP, group_size=64), 5),
        ((30, 41), QuantSpec(Granularity.TENSOR, symmetric=True), 7),
        ((0, 5), QuantSpec(), 4),
    ]


def _same_packed(a: PackedTensor, b: PackedTensor) -> bool:
    return (
        torch.equal(a.payload, b.payload)
        and torch.equal(a.scales, b.scales)
        and torch.equal(a.bits, b.bits)
        and (a.row_scales is None) == (b.row_scales is None)
        and (a.outlier_index is None) == (b.outlier_index is None)
    )


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codec_quantize_through_the_kernels_sends_the_same_bytes(
    stochastic: bool, dtype: torch.dtype
) -> None:
    assert dispatch.kernels_for(torch.device("cpu"), 1) is fedq_kernels
    rng = random.Random(1)
    for shape, base, bits in _codec_cases():
        x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2).to(dtype)
        if len(shape) == 3 and shape[0] == 4:
            x[:, 0] *= 40.0
        spec = dataclasses.replace(base, stochastic=stochastic)
        if bits == "mixed":
            nb = spec.layout_for(shape, bit_map=True).num_blocks
            bm = torch.tensor([rng.randint(1, 8) for _ in range(nb)], dtype=torch.uint8)
            got = quantize(x, bm, spec, seed=9)
            with dispatch.torch_only():
                want = quantize(x, bm, spec, seed=9)
        else:
            assert isinstance(bits, int)
            got = quantize(x, bits, spec, seed=9)
            with dispatch.torch_only():
                want = quantize(x, bits, spec, seed=9)
        assert _same_packed(got, want), (shape, spec)


@pytest.mark.usefixtures("cpu_kernels")
def test_without_a_seed_the_kernel_path_draws_one_from_the_generator() -> None:
    x = torch.randn(9, 31)
    spec = QuantSpec(stochastic=True)
    a = quantize(x, 3, spec, generator=torch.Generator().manual_seed(5))
    b = quantize(x, 3, spec, generator=torch.Generator().manual_seed(5))
    c = quantize(x, 3, spec, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.payload, b.payload) and not torch.equal(a.payload, c.payload)


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("symmetric", [False, True])
def test_a_range_beyond_float16_scales_is_refused_before_the_kernel(symmetric: bool) -> None:
    """The kernel path shares the codec's scale check: range 1e8 at 8 bits overflows float16
    scales (a CodecError, no bytes), and with float32 scales the kernel sends the torch bytes."""
    assert dispatch.kernels_for(torch.device("cpu"), 1) is fedq_kernels
    x = torch.linspace(-5e7, 5e7, 4096).reshape(16, 256)
    with pytest.raises(CodecError, match="overflows float16"):
        quantize(x, 8, QuantSpec(symmetric=symmetric))
    spec = QuantSpec(symmetric=symmetric, scale_dtype="float32")
    got = quantize(x, 8, spec)
    with dispatch.torch_only():
        want = quantize(x, 8, spec)
    assert _same_packed(got, want)


def test_bad_inputs_are_codec_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = LAYOUTS[0]
    bm = torch.full((layout.num_blocks,), 4, dtype=torch.uint8)
    xb, div, centre = _inputs(layout, bm, False, torch.float32, 0)
    with pytest.raises(CodecError, match="block view"):
        fedq_kernels.quantize_pack(xb[:-1], bm, layout, div, centre, symmetric=False)
    with pytest.raises(CodecError, match="bit map"):
        fedq_kernels.quantize_pack(xb, bm[:-1], layout, div, centre, symmetric=False)
    with pytest.raises(CodecError, match="divisor"):
        fedq_kernels.quantize_pack(xb, bm, layout, div.half(), centre, symmetric=False)
    with pytest.raises(CodecError, match="centre"):
        fedq_kernels.quantize_pack(xb, bm, layout, div, centre[:-1], symmetric=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(CodecError, match="CUDA device"):
        fedq_kernels.quantize_pack(xb, bm, layout, div, centre, symmetric=False)
