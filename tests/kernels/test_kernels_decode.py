"""Fused unpack + dequantize under the interpreter: bit-identical to the codec's torch path for
every width, mixed maps, every granularity and axis, partial groups, symmetric and asymmetric,
row scales and outlier rows, float32/float16/bfloat16 outputs, irregular and empty shapes."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton", reason="fedq_kernels need triton (pip install fedq[kernels])")

import fedq_kernels

from fedq.codec import Encoding, Granularity, QuantSpec, quantize, raw
from fedq.codec.layout import BlockLayout
from fedq.codec.packed import PackedTensor, expected_payload_nbytes
from fedq.errors import CodecError

Same = Callable[[torch.Tensor, torch.Tensor], bool]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPE = (6, 7, 5)  # 210 elements, no power of two
CUTS = [
    (Granularity.TENSOR, 0, 0),
    (Granularity.CHANNEL, 0, 0),
    (Granularity.CHANNEL, 1, 0),  # a middle axis
    (Granularity.CHANNEL, 2, 0),  # the last axis
    (Granularity.GROUP, 0, 16),  # partial last group of 2
    (Granularity.GROUP, 0, 1),
]


def _spec(cut: tuple[Granularity, int, int], **kw: object) -> QuantSpec:
    gran, axis, gs = cut
    return QuantSpec(granularity=gran, axis=axis, group_size=gs or 128, **kw)  # type: ignore[arg-type]


def _check(p: PackedTensor, same: Same, dtypes: list[torch.dtype] = DTYPES) -> None:
    for dtype in dtypes:
        got = fedq_kernels.dequantize(p, dtype=dtype)
        want = fedq_kernels.dequantize_ref(p, dtype=dtype)
        assert same(got, want), (p.layout, p.bits.tolist(), dtype)


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"{c[0].value}{c[1]}g{c[2]}")
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_every_width_and_cut_decodes_bit_exact(
    cut: tuple[Granularity, int, int], symmetric: bool, scale_dtype: str, bits_equal: Same
) -> None:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)) * 3 + 0.5
    for bits in range(1, 9):
        p = quantize(x, bits, _spec(cut, symmetric=symmetric, scale_dtype=scale_dtype))
        assert p.layout.granularity is cut[0]
        _check(p, bits_equal)


def _synthetic(layout: BlockLayout, bm: torch.Tensor, symmetric: bool, seed: int) -> PackedTensor:
    """Any payload the format allows: random bytes (the unused bits at the end of each run
    included), random scales (zeros among them) and offsets of either sign."""
    g = torch.Generator().manual_seed(seed)
    nb = layout.num_blocks
    payload = torch.randint(
        0, 256, (expected_payload_nbytes(layout, bm),), generator=g, dtype=torch.uint8
    )
    scales = (torch.rand(nb, generator=g) * 4).to(torch.float16)
    scales[::5] = 0
    offsets = None if symmetric else (torch.randn(nb, generator=g) * 10).to(torch.float16)
    return PackedTensor(
        layout.shape,
        "float32",
        Encoding.QUANTIZED,
        layout.granularity,
        layout.axis,
        layout.group_size,
        symmetric,
        "float16",
        bm,
        scales,
        offsets,
        payload,
    )


@pytest.mark.parametrize(
    "layout",
    [
        BlockLayout.build((13, 11), Granularity.CHANNEL, axis=0),
        BlockLayout.build((5, 3, 7), Granularity.CHANNEL, axis=2),
        BlockLayout.build((5, 3, 7), Granularity.CHANNEL, axis=1),
        BlockLayout.build((1001,), Granularity.GROUP, group_size=64),  # partial last group
        BlockLayout.build((9, 7), Granularity.GROUP, group_size=5),
        BlockLayout.build((4, 9), Granularity.TENSOR),
    ],
    ids=["ch0", "ch-last", "ch-mid", "grp1001", "grp9x7", "tensor"],
)
@pytest.mark.parametrize("symmetric", [False, True])
def test_mixed_maps_and_raw_payload_bytes_decode_bit_exact(
    layout: BlockLayout, symmetric: bool, bits_equal: Same
) -> None:
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        bm = torch.randint(1, 9, (layout.num_blocks,), generator=g, dtype=torch.uint8)
        bm[-1] = 3  # the (possibly partial) last block in a straddling width
        _check(_synthetic(layout, bm, symmetric, seed), bits_equal)


def _massive(seed: int) -> torch.Tensor:
    x = torch.randn(4, 16, 24, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= 40.0  # attention-sink rows: sent as float16 outlier rows
    x[2, 5] = 0.0  # a zero row: row scale 0
    return x


@pytest.mark.parametrize("cut", CUTS[:5], ids=lambda c: f"{c[0].value}{c[1]}g{c[2]}")
def test_row_scales_and_outlier_rows_decode_bit_exact(
    cut: tuple[Granularity, int, int], bits_equal: Same
) -> None:
    x = _massive(3)
    nb = _spec(cut).layout_for(tuple(x.shape), bit_map=True).num_blocks
    mixed = torch.randint(
        1, 9, (nb,), generator=torch.Generator().manual_seed(4), dtype=torch.uint8
    )
    cases: list[tuple[dict[str, object], int | torch.Tensor]] = [
        ({"row_scale": True, "range": "sigma"}, 3),
        ({"outlier_ratio": 3.0}, 4),
        ({"row_scale": True, "outlier_ratio": 3.0, "range": "mse"}, mixed),
        ({"row_scale": True, "symmetric": True, "scale_dtype": "float32"}, 2),
    ]
    for kw, bits in cases:
        p = quantize(x, bits, _spec(cut, **kw))
        assert (p.row_scales is not None) == bool(kw.get("row_scale"))
        assert (p.outlier_index is not None) == ("outlier_ratio" in kw)
        _check(p, bits_equal)


def test_random_layouts_decode_bit_exact(bits_equal: Same) -> None:
    """Seeded random cases over everything the codec can produce: rank 1-4 shapes with dims
    1-9, any granularity / axis / group size, one width or a mixed map, symmetric or not,
    scale dtypes, stochastic codes, row scales and outliers, each in all three output dtypes."""
    rng = random.Random(11)
    for case in range(40):
        shape = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 4)))
        gran = rng.choice(list(Granularity))
        sym = rng.random() < 0.5
        spec = QuantSpec(
            granularity=gran,
            axis=rng.randrange(len(shape)),
            group_size=rng.randint(1, 40),
            symmetric=sym,
            stochastic=rng.random() < 0.3,
            scale_dtype=rng.choice(["float16", "float32"]),
            range="minmax" if sym else rng.choice(["minmax", "sigma", "mse"]),
            row_scale=rng.random() < 0.4,
            outlier_ratio=rng.choice([0.0, 0.0, 2.0]),
        )
        x = torch.randn(shape, generator=torch.Generator().manual_seed(case)) * 5
        x = x.to(rng.choice(DTYPES))
        nb = spec.layout_for(shape, bit_map=True).num_blocks
        bits: int | torch.Tensor = rng.randint(1, 8)
        if rng.random() < 0.5:
            bits = torch.tensor([rng.randint(1, 8) for _ in range(nb)], dtype=torch.uint8)
        p = quantize(x, bits, spec, seed=case)
        _check(p, bits_equal)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (3, 0, 2)])
def test_empty_tensors(shape: tuple[int, ...]) -> None:
    for cut in CUTS:
        if cut[1] >= len(shape):
            continue
        p = quantize(torch.empty(shape, dtype=torch.float16), 4, _spec(cut))
        y = fedq_kernels.dequantize(p)
        assert y.shape == shape and y.dtype == torch.float16


def test_a_plan_serves_every_payload_of_its_header(bits_equal: Same) -> None:
    layout = BlockLayout.build((12, 10), Granularity.CHANNEL, axis=1)
    bm = torch.randint(1, 9, (10,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    p = _synthetic(layout, bm, False, 0)
    plan = fedq_kernels.DecodePlan.build(p, "cpu")
    for seed in (1, 2):
        q = dataclasses.replace(p, payload=_synthetic(layout, bm, False, seed).payload)
        assert bits_equal(fedq_kernels.dequantize(q, plan=plan), fedq_kernels.dequantize_ref(q))


def test_bad_inputs_are_codec_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    p = quantize(torch.randn(8, 6), 3)
    with pytest.raises(CodecError, match="RAW"):
        fedq_kernels.dequantize(raw(torch.randn(3)))
    with pytest.raises(CodecError, match="payload must be"):
        fedq_kernels.dequantize(dataclasses.replace(p, payload=p.payload[:-1]))
    with pytest.raises(CodecError, match="bit map"):
        fedq_kernels.dequantize(dataclasses.replace(p, bits=torch.full((8,), 9, dtype=torch.uint8)))
    with pytest.raises(CodecError, match="scales"):
        fedq_kernels.dequantize(dataclasses.replace(p, scales=p.scales[:-1]))
    with pytest.raises(CodecError, match="offsets"):
        fedq_kernels.dequantize(dataclasses.replace(p, offsets=None))
    with pytest.raises(CodecError, match="row_scales"):
        fedq_kernels.dequantize(dataclasses.replace(p, row_scales=torch.ones(3).half()))
    with pytest.raises(CodecError, match="format"):
        fedq_kernels.dequantize(dataclasses.replace(p, version=2))
    with pytest.raises(CodecError, match="code range"):
        plan = fedq_kernels.DecodePlan.build(p, "cpu")
        fedq_kernels.decode_range(plan, p.payload, torch.empty(48), 0, 0, 49)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(CodecError, match="CUDA device"):
        fedq_kernels.dequantize(p)
