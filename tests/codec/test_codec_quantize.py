"""Quantization maths: error bounds, unbiased stochastic rounding, mixed bit maps and edge cases."""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.codec import Encoding, Granularity, QuantSpec, dequantize, quantize, raw
from fedq.codec.compressors import QuantCompressor
from fedq.codec.layout import BlockLayout
from fedq.codec.packed import PackedTensor, expected_payload_nbytes
from fedq.codec.quantize import MSE_SEARCH_SAMPLES, _pack_by_class, _unpack_by_class
from fedq.errors import CodecError
from fedq.wire import WireLimits, bundle_from_bytes, bundle_to_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPE = (6, 7, 5)  # 210 elements: no power of two anywhere

# (granularity, axis, group_size): every way to cut SHAPE into blocks, awkward ones included.
CUTS = [
    (Granularity.TENSOR, 0, 0),
    (Granularity.CHANNEL, 0, 0),
    (Granularity.CHANNEL, 1, 0),
    (Granularity.CHANNEL, -1, 0),
    (Granularity.GROUP, 0, 16),  # 16 does not divide 210: partial last group of 2
    (Granularity.GROUP, 0, 1),
]


def _spec(cut: tuple[Granularity, int, int], **kw: object) -> QuantSpec:
    gran, axis, gs = cut
    return QuantSpec(granularity=gran, axis=axis, group_size=gs or 128, **kw)  # type: ignore[arg-type]


def _per_element(p: PackedTensor, per_block: torch.Tensor) -> torch.Tensor:
    """Broadcast a [num_blocks] tensor to the element positions of ``p``'s shape."""
    lay = p.layout
    rows = per_block.float().unsqueeze(1).expand(lay.num_blocks, lay.block_len)
    return lay.from_blocks(rows.contiguous())


def _assert_within_half_step(x: torch.Tensor, p: PackedTensor) -> None:
    """|x_hat - x| <= scale/2 per element, plus float slack (coding maths, output rounding)."""
    y = dequantize(p)
    assert y.dtype == x.dtype and y.shape == x.shape
    xf, yf = x.float(), y.float()
    s = _per_element(p, p.scales)
    off = _per_element(p, p.offsets).abs() if p.offsets is not None else torch.zeros_like(s)
    eps_out = torch.finfo(x.dtype).eps
    eps32 = torch.finfo(torch.float32).eps
    slack = 1e-4 * s + eps_out * yf.abs() + 8 * eps32 * (xf.abs() + off)
    err = (yf - xf).abs()
    worst = float((err - (s / 2 + slack)).max())
    assert worst <= 0, f"error exceeds scale/2 by {worst}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"{c[0].value}{c[1]}g{c[2]}")
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_round_to_nearest_error_within_half_step(
    dtype: torch.dtype, cut: tuple[Granularity, int, int], symmetric: bool, scale_dtype: str
) -> None:
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(SHAPE, generator=g) * 3 + 0.5).to(dtype)
    spec = _spec(cut, symmetric=symmetric, scale_dtype=scale_dtype)
    for bits in range(1, 9):
        p = quantize(x, bits, spec)
        assert p.scales.dtype == getattr(torch, scale_dtype)
        assert p.mean_bits() == bits
        _assert_within_half_step(x, p)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    bits=st.integers(1, 8),
    gran=st.sampled_from(list(Granularity)),
    axis=st.integers(-3, 2),
    group_size=st.integers(1, 40),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_error_bound_property(
    shape: list[int],
    bits: int,
    gran: Granularity,
    axis: int,
    group_size: int,
    symmetric: bool,
    seed: int,
) -> None:
    axis = axis % len(shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10
    p = quantize(x, bits, QuantSpec(gran, axis=axis, group_size=group_size, symmetric=symmetric))
    _assert_within_half_step(x, p)


def test_per_channel_degrades_to_per_tensor_on_vectors() -> None:
    p = quantize(torch.randn(33), 4)  # default spec is per-channel
    assert p.granularity is Granularity.TENSOR and p.scales.numel() == 1


@pytest.mark.parametrize("symmetric", [False, True])
def test_stochastic_rounding_is_unbiased(symmetric: bool) -> None:
    """N independent stochastic quantizations of a fixed vector ``x`` (rows of a per-channel
    tensor: every row is one block with the same scale, independent noise). Each decoded value is
    within one step of x and its variance is at most scale**2/4, so the mean over N rows has std
    at most scale/(2*sqrt(N)); we allow 5 of those. Round-to-nearest would be off by up to
    scale/2, about 22x the tolerance here, so the test also catches "stochastic flag ignored"."""
    n_rows, bits = 4000, 2
    x = torch.randn(64, generator=torch.Generator().manual_seed(3))
    xs = x.expand(n_rows, 64)
    spec = QuantSpec(
        Granularity.CHANNEL, symmetric=symmetric, stochastic=True, scale_dtype="float32"
    )
    gen = torch.Generator().manual_seed(11)
    p = quantize(xs, bits, spec, generator=gen)
    y = dequantize(p)
    scale = float(p.scales[0])
    assert torch.all(p.scales == scale)
    assert float((y - xs).abs().max()) < scale  # never more than one step away
    tol = 5 * math.sqrt(scale**2 / 4 / n_rows)
    bias = (y.mean(dim=0) - x).abs()
    assert float(bias.max()) <= tol, f"max |mean - x| = {float(bias.max())} > {tol}"
    rtn = dequantize(quantize(x, bits, QuantSpec(Granularity.TENSOR, symmetric=symmetric))) - x
    assert float(rtn.abs().max()) > 3 * tol  # the tolerance is tight enough to tell RTN apart


def test_stochastic_rounding_follows_the_generator() -> None:
    x = torch.randn(9, 31)
    spec = QuantSpec(stochastic=True)
    a = quantize(x, 3, spec, generator=torch.Generator().manual_seed(5))
    b = quantize(x, 3, spec, generator=torch.Generator().manual_seed(5))
    c = quantize(x, 3, spec, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.payload, b.payload)
    assert not torch.equal(a.payload, c.payload)


# ---- mixed bit maps ---------------------------------------------------------------------------


def _random_codes(layout: BlockLayout, bm: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((layout.num_blocks, layout.block_len), generator=g)
    codes = (u * (2 ** bm.to(torch.int64)).unsqueeze(1)).floor().to(torch.uint8)
    if layout.padding:
        codes[-1, layout.last_len :] = 0  # padding decodes as zero codes
    return codes


@pytest.mark.parametrize(
    "layout",
    [
        BlockLayout.build((13, 11), Granularity.CHANNEL, axis=0),
        BlockLayout.build((5, 3, 7), Granularity.CHANNEL, axis=-1),
        BlockLayout.build((1001,), Granularity.GROUP, group_size=64),  # partial last group
        BlockLayout.build((9, 7), Granularity.GROUP, group_size=5),
    ],
    ids=["ch13x11", "ch5x3x7", "grp1001", "grp9x7"],
)
def test_mixed_map_codes_round_trip_exactly(layout: BlockLayout) -> None:
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        bm = torch.randint(1, 9, (layout.num_blocks,), generator=g, dtype=torch.uint8)
        bm[-1] = 3  # the partial block sits in a non-byte-aligned class
        codes = _random_codes(layout, bm, seed)
        payload = _pack_by_class(codes, bm, layout)
        assert payload.numel() == expected_payload_nbytes(layout, bm)
        p = PackedTensor(
            layout.shape,
            "float32",
            Encoding.QUANTIZED,
            layout.granularity,
            layout.axis,
            layout.group_size,
            False,
            "float32",
            bm,
            torch.ones(layout.num_blocks),
            torch.zeros(layout.num_blocks),
            payload,
        )
        assert torch.equal(_unpack_by_class(p, layout), codes)
        # Decoding with unit scales and zero offsets returns the codes themselves.
        assert torch.equal(dequantize(p), layout.from_blocks(codes.float()))


@pytest.mark.parametrize("symmetric", [False, True])
def test_mixed_map_quantize_respects_each_blocks_width(symmetric: bool) -> None:
    x = torch.randn(12, 17, generator=torch.Generator().manual_seed(1))
    bm = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 8, 3, 1, 5], dtype=torch.uint8)
    p = quantize(x, bm, QuantSpec(symmetric=symmetric, scale_dtype="float32"))
    assert torch.equal(p.bits, bm)
    _assert_within_half_step(x, p)
    codes = _unpack_by_class(p, p.layout)
    assert bool((codes.to(torch.int64) < (2 ** bm.to(torch.int64)).unsqueeze(1)).all())
    # Finer blocks get finer steps: the error of each row shrinks with its width.
    err = (dequantize(p) - x).abs().amax(dim=1)
    assert float(err[7]) < float(err[0]) / 20


def test_mixed_group_map_on_irregular_shape() -> None:
    x = torch.randn(7, 13, 3) * 4
    spec = QuantSpec(Granularity.GROUP, group_size=10)  # 273 elements -> 28 groups, last has 3
    bm = torch.randint(1, 9, (28,), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    p = quantize(x, bm, spec)
    assert p.payload_nbytes == expected_payload_nbytes(p.layout, bm)
    _assert_within_half_step(x, p)


def test_mean_bits_and_metadata_for_mixed_maps() -> None:
    bm = torch.tensor([1, 2, 3, 8], dtype=torch.uint8)
    x = torch.randn(4, 10)
    p = quantize(x, bm, QuantSpec(scale_dtype="float16"))
    assert p.mean_bits() == pytest.approx((10 * (1 + 2 + 3 + 8)) / 40)
    assert p.metadata_nbytes == 4 * 2 + 4 * 2 + 4  # fp16 scales + fp16 offsets + bit map
    assert p.payload_nbytes == 2 + 3 + 4 + 10  # ceil(10*b/8) per class
    p = quantize(x, bm, QuantSpec(symmetric=True, scale_dtype="float32"))
    assert p.metadata_nbytes == 4 * 4 + 4  # no offsets when symmetric
    # Group blocks with a partial last group: lengths [10, 10, 5].
    p = quantize(
        torch.randn(25),
        torch.tensor([8, 1, 4], dtype=torch.uint8),
        QuantSpec(Granularity.GROUP, group_size=10),
    )
    assert p.mean_bits() == pytest.approx((80 + 10 + 20) / 25)
    assert p.payload_nbytes == 2 + 3 + 10
    assert raw(torch.randn(3, dtype=torch.float16)).mean_bits() == 16.0


# ---- edge cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (3, 0, 2)])
@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"{c[0].value}{c[1]}g{c[2]}")
def test_empty_tensors(shape: tuple[int, ...], cut: tuple[Granularity, int, int]) -> None:
    for symmetric in (False, True):
        x = torch.empty(shape, dtype=torch.float16)
        p = quantize(x, 4, _spec(cut, symmetric=symmetric))
        assert p.payload_nbytes == 0 and p.scales.numel() == 0
        y = dequantize(p)
        assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"{c[0].value}{c[1]}g{c[2]}")
@pytest.mark.parametrize("value", [0.0, 3.25, -2.0, 0.1])
def test_constant_tensors_decode_without_nan(
    cut: tuple[Granularity, int, int], value: float
) -> None:
    x = torch.full(SHAPE, value)
    for bits in (1, 3, 8):
        for symmetric in (False, True):
            for scale_dtype in ("float16", "float32"):
                p = quantize(x, bits, _spec(cut, symmetric=symmetric, scale_dtype=scale_dtype))
                y = dequantize(p)
                assert bool(torch.isfinite(y).all())
                _assert_within_half_step(x, p)
                if value == 0.0 or (not symmetric and (scale_dtype == "float32" or value != 0.1)):
                    assert torch.equal(y, x), (bits, symmetric, scale_dtype)  # zero range: exact


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"{c[0].value}{c[1]}g{c[2]}")
def test_non_finite_input_is_a_codec_error(bad: float, cut: tuple[Granularity, int, int]) -> None:
    x = torch.randn(SHAPE)
    x[2, 3, 4] = bad
    for symmetric in (False, True):
        with pytest.raises(CodecError, match="NaN or Inf"):
            quantize(x.to(torch.bfloat16), 4, _spec(cut, symmetric=symmetric))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(range="sigma"),
        QuantSpec(range="mse"),
        QuantSpec(axis=-1, row_scale=True),
        QuantSpec(axis=-1, outlier_ratio=2.0),
        QuantSpec(scale_dtype="float32"),
    ],
    ids=["sigma", "mse", "row_scale", "outliers", "fp32_scales"],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_a_codec_error_with_every_option(spec: QuantSpec, bad: float) -> None:
    x = torch.randn(16, 40)
    x[3, 7] = bad
    with pytest.raises(CodecError, match="NaN or Inf"):
        quantize(x, 8, spec)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(), QuantSpec(symmetric=True), QuantSpec(range="sigma"), QuantSpec(range="mse")],
    ids=["minmax", "symmetric", "sigma", "mse"],
)
@pytest.mark.parametrize("lo", [-5e7, 0.0], ids=["centred", "positive"])
def test_a_range_beyond_float16_scales_is_a_codec_error(spec: QuantSpec, lo: float) -> None:
    """Range 1e8 at 8 bits needs a scale of about 3.9e5 (or an offset of -5e7): float16 would
    round it to infinity, which every receiver refuses; the encoder says so instead."""
    x = torch.linspace(lo, lo + 1e8, 4096)  # rank 1: one block, range 1e8
    with pytest.raises(CodecError, match="overflows float16") as e:
        quantize(x, 8, spec)
    assert "scale_dtype: float32" in str(e.value)
    p = quantize(x, 8, dataclasses.replace(spec, scale_dtype="float32"))
    back = bundle_from_bytes(bundle_to_bytes({"w": p}), WireLimits())["w"]
    y = dequantize(back)
    assert bool(torch.isfinite(y).all())
    if spec.range == "minmax":
        _assert_within_half_step(x, p)


def test_the_float16_limit_is_refused_exactly_where_the_bytes_would_be() -> None:
    """Ranges just inside the float16 limit (65504 x 255 at 8 bits) still go as before and decode;
    just beyond it they are refused. A finite tensor either raises or makes bytes that decode."""
    top = 65504.0 * 255
    ok = quantize(torch.tensor([0.0, top * 0.999]), 8, QuantSpec())
    assert bool(torch.isfinite(ok.scales).all())
    with pytest.raises(CodecError, match=r"block 0 spans \[0, 1\.67.*at 8 bits"):
        quantize(torch.tensor([0.0, top * 1.001]), 8, QuantSpec())
    with pytest.raises(CodecError, match="offset overflows float16"):
        quantize(torch.tensor([-7e4, -6.9e4]), 8, QuantSpec())
    with pytest.raises(CodecError, match="overflows float32, which at 8 bits carries range <="):
        quantize(torch.tensor([-3e38, 3e38]), 8, QuantSpec(scale_dtype="float32"))
    gen = torch.Generator().manual_seed(0)
    outcomes = {"refused": 0, "decoded": 0}
    for _ in range(200):
        mag = 10.0 ** float(torch.randint(0, 39, (), generator=gen))
        x = torch.randn(4, 32, generator=gen) * mag + torch.randn((), generator=gen) * mag
        bits = int(torch.randint(1, 9, (), generator=gen))
        sym = bool(torch.randint(0, 2, (), generator=gen))
        for sdt in ("float16", "float32"):
            try:
                p = quantize(x, bits, QuantSpec(symmetric=sym, scale_dtype=sdt))
            except CodecError:
                outcomes["refused"] += 1
                continue
            back = bundle_from_bytes(bundle_to_bytes({"w": p}), WireLimits())  # accepted
            assert bool(torch.isfinite(dequantize(back["w"])).all())
            outcomes["decoded"] += 1
    assert min(outcomes.values()) > 50, outcomes


def test_row_scales_beyond_float16_say_so() -> None:
    x = torch.randn(8, 32)
    x[2] *= 1e6  # finite, but its RMS is beyond a float16 row scale
    with pytest.raises(CodecError, match="RMS overflows the float16 row scales"):
        quantize(x, 8, QuantSpec(axis=-1, row_scale=True))


def test_the_compressor_names_the_tensor_it_cannot_encode() -> None:
    x = torch.linspace(-5e7, 5e7, 4096).reshape(16, 256)
    with pytest.raises(CodecError, match=r"tensor 'fc\.weight': block 0 spans"):
        QuantCompressor(QuantSpec()).compress("fc.weight", x, 8)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
def test_non_contiguous_inputs_match_contiguous_copies(symmetric: bool, stochastic: bool) -> None:
    base = torch.randn(24, 40)
    views = [base.t(), base[:, 3:37:2], base[5:19], base.view(4, 6, 40).permute(2, 0, 1)]
    for view in views:
        assert not view.is_contiguous() or view.storage_offset() != 0
        for cut in CUTS:
            if cut[0] is Granularity.CHANNEL and cut[1] >= view.dim():
                continue
            spec = _spec(cut, symmetric=symmetric, stochastic=stochastic)
            a = quantize(view, 5, spec, generator=torch.Generator().manual_seed(0))
            b = quantize(view.contiguous(), 5, spec, generator=torch.Generator().manual_seed(0))
            assert torch.equal(a.payload, b.payload)
            assert torch.equal(a.scales, b.scales)
            assert torch.equal(dequantize(a), dequantize(b))


@pytest.mark.parametrize("bits", [0, 9, -3])
def test_bad_bit_widths_are_codec_errors(bits: int) -> None:
    with pytest.raises(CodecError):
        quantize(torch.randn(4, 4), bits)
    with pytest.raises(CodecError):
        quantize(torch.randn(4, 4), torch.tensor([4, 4, bits, 4]))


def test_bad_bit_maps_are_codec_errors() -> None:
    x = torch.randn(4, 6)
    with pytest.raises(CodecError, match="integer"):
        quantize(x, torch.tensor([4.0, 4.0, 4.0, 4.0]))
    with pytest.raises(CodecError, match="entries"):
        quantize(x, torch.tensor([4, 4, 4], dtype=torch.uint8))
    with pytest.raises(CodecError, match="entries"):
        quantize(x, torch.tensor([4, 4, 4, 4, 4], dtype=torch.uint8))


def test_unsupported_dtype_is_rejected() -> None:
    with pytest.raises(ValueError):
        quantize(torch.arange(8, dtype=torch.float64), 4)


# ---- piecewise processing ---------------------------------------------------------------------


@pytest.mark.parametrize("max_elems", [1, 7, 64, 1000])
@pytest.mark.parametrize(
    "layout",
    [
        BlockLayout.build((37, 29), Granularity.CHANNEL, axis=1),
        BlockLayout.build((1001,), Granularity.TENSOR),
        BlockLayout.build((1001,), Granularity.GROUP, group_size=100),
    ],
    ids=["channel", "tensor", "group"],
)
def test_pieces_tile_the_block_view_in_element_order(layout: BlockLayout, max_elems: int) -> None:
    seen = torch.zeros(layout.num_blocks, layout.block_len, dtype=torch.int64)
    order = torch.arange(seen.numel()).view_as(seen)
    last = -1
    for rows, cols, _ in layout.pieces(max_elems):
        piece = order[rows, cols]
        assert 0 < piece.numel() <= max_elems
        assert int(piece.min()) == last + 1  # contiguous with the previous piece
        last = int(piece.max())
        seen[rows, cols] += 1
    assert bool((seen == 1).all())


@pytest.mark.parametrize("max_elems", [5, 96])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
def test_results_do_not_depend_on_the_piece_size(
    monkeypatch: pytest.MonkeyPatch, max_elems: int, symmetric: bool, stochastic: bool
) -> None:
    """The codec works in cache-sized pieces; piece boundaries (rows, or columns of one long
    block) must not change a single bit of the output, nor the stochastic noise stream."""
    qmod = importlib.import_module("fedq.codec.quantize")  # the package re-exports the function
    x = torch.randn(30, 41, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    cases: list[tuple[QuantSpec, int | torch.Tensor]] = [
        (QuantSpec(Granularity.CHANNEL), 3),
        (QuantSpec(Granularity.CHANNEL, axis=1), torch.randint(1, 9, (41,), dtype=torch.uint8)),
        (QuantSpec(Granularity.TENSOR), 5),
        (QuantSpec(Granularity.GROUP, group_size=100), 2),
    ]
    for base, bits in cases:
        spec = QuantSpec(
            base.granularity, base.axis, base.group_size, symmetric, stochastic, "float32"
        )
        ref = quantize(x, bits, spec, generator=torch.Generator().manual_seed(1))
        ref_y = dequantize(ref)
        with monkeypatch.context() as m:
            m.setattr(qmod, "_PIECE_ELEMS", max_elems)
            got = quantize(x, bits, spec, generator=torch.Generator().manual_seed(1))
            got_y = dequantize(got)
        assert torch.equal(got.payload, ref.payload)
        assert torch.equal(got.scales, ref.scales)
        assert torch.equal(got_y, ref_y)


def test_short_channels_use_groups_unless_a_bit_map_is_given() -> None:
    from fedq.codec.quantize import MIN_CHANNEL_BLOCK

    spec = QuantSpec(Granularity.CHANNEL, axis=0, group_size=128)
    lora_b = torch.randn(384, 8)  # [out, r]: 8 values per row
    p = quantize(lora_b, 4, spec)
    assert MIN_CHANNEL_BLOCK > 8 and p.granularity is Granularity.GROUP
    assert p.metadata_nbytes < p.payload_nbytes / 10  # 24 groups, not 384 rows of metadata
    long_rows = quantize(torch.randn(8, 384), 4, spec)
    assert long_rows.granularity is Granularity.CHANNEL and long_rows.bits.numel() == 8
    explicit = quantize(lora_b, torch.full((384,), 4, dtype=torch.uint8), spec)
    assert explicit.granularity is Granularity.CHANNEL  # the caller chose the blocks


def _gaussian_channels(n: int = 4096, c: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, c, generator=g) * torch.linspace(0.5, 4.0, c) + torch.arange(c)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_sigma_range_reaches_the_gaussian_optimum(bits: int) -> None:
    """Clipping each block to mean +- k_b std gives (about) the MSE of Max's optimal uniform
    quantizer of a Gaussian, far below min-max at 1-2 bits, and stays inside the block's range."""
    x = _gaussian_channels()
    var = x.var(dim=0)
    optimum = {1: 0.363, 2: 0.119, 3: 0.0374, 4: 0.0115}[bits]

    def rel_mse(spec: QuantSpec) -> torch.Tensor:
        return ((dequantize(quantize(x, bits, spec)) - x) ** 2).mean(dim=0) / var

    sigma = rel_mse(QuantSpec(axis=1, range="sigma", scale_dtype="float32"))
    minmax = rel_mse(QuantSpec(axis=1, scale_dtype="float32"))
    assert torch.allclose(sigma, torch.full_like(sigma, optimum), rtol=0.15), sigma
    assert bool((sigma < minmax).all())
    if bits <= 2:
        assert bool((sigma < minmax / 2).all())
    y = dequantize(quantize(x, bits, QuantSpec(axis=1, range="sigma")))
    assert bool((y.amin(0) >= x.amin(0) - 1e-2).all() and (y.amax(0) <= x.amax(0) + 1e-2).all())


def test_sigma_range_needs_asymmetric_blocks() -> None:
    with pytest.raises(CodecError, match="asymmetric"):
        QuantSpec(range="sigma", symmetric=True)
    with pytest.raises(CodecError, match="asymmetric"):
        QuantSpec(range="mse", symmetric=True)
    with pytest.raises(CodecError, match="range"):
        QuantSpec(range="max")  # type: ignore[arg-type]


def _block_sq_err(x: torch.Tensor, bits: int, spec: QuantSpec) -> torch.Tensor:
    """Squared reconstruction error of each column of ``x`` (the blocks of ``axis=1``)."""
    return ((dequantize(quantize(x, bits, spec)) - x) ** 2).sum(dim=0)


def _laplace_and_gaussian_blocks(n: int) -> torch.Tensor:
    """[n, 8]: four Gaussian and four Laplace (heavy-tailed, like an LLM's residual stream)
    columns of different scales and centres."""
    g = torch.Generator().manual_seed(11)
    gauss = torch.randn(n, 4, generator=g)
    u = torch.rand(n, 4, generator=g) - 0.5
    heavy = -u.sign() * torch.log1p(-2 * u.abs())  # Laplace(0, 1) by inversion
    return torch.cat([gauss, heavy], dim=1) * torch.linspace(0.5, 3.0, 8) + torch.arange(8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_mse_range_is_never_worse_than_sigma_or_minmax(bits: int) -> None:
    """``range="mse"`` picks, per block, the candidate range with the least error: no block is
    worse than with the Gaussian clip (a candidate) or min-max (another), and the heavy-tailed
    blocks are strictly better than with the Gaussian clip from 3 bits up, where it cuts too much
    of their tails. Blocks of MSE_SEARCH_SAMPLES values are scored whole, so "never worse" is
    exact; longer ones partly on a strided sample (next test)."""
    x = _laplace_and_gaussian_blocks(MSE_SEARCH_SAMPLES)
    err = {
        r: _block_sq_err(x, bits, QuantSpec(axis=1, range=r, scale_dtype="float32"))
        for r in ("minmax", "sigma", "mse")
    }
    tol = 1e-5 * err["minmax"]
    assert bool((err["mse"] <= err["sigma"] + tol).all()), (err["mse"], err["sigma"])
    assert bool((err["mse"] <= err["minmax"] + tol).all()), (err["mse"], err["minmax"])
    if bits in (3, 4):
        assert bool((err["mse"][4:] < 0.92 * err["sigma"][4:]).all()), (err["mse"], err["sigma"])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_range_on_a_sample_of_long_blocks(bits: int) -> None:
    """Blocks 16x longer than the sample (rounding error estimated on the sample, clipping error
    exact): every block within 5% of the better of sigma and min-max, and the heavy-tailed ones
    well below sigma from 3 bits up (at 8 bits by far: the Gaussian clip, 3.9 std, cuts their
    tails)."""
    x = _laplace_and_gaussian_blocks(16 * MSE_SEARCH_SAMPLES)
    err = {
        r: _block_sq_err(x, bits, QuantSpec(axis=1, range=r, scale_dtype="float32"))
        for r in ("minmax", "sigma", "mse")
    }
    best = torch.minimum(err["sigma"], err["minmax"])
    assert bool((err["mse"] <= 1.05 * best).all()), (err["mse"], best)
    if bits >= 3:
        gain = 0.5 if bits == 8 else 0.92
        assert bool((err["mse"][4:] < gain * err["sigma"][4:]).all()), (err["mse"], err["sigma"])


def test_mse_range_needs_nothing_new_on_the_wire() -> None:
    """The search is the encoder's alone: same format, same byte counts, and a partial last group
    (padded by repetition) and a constant block still decode within half a step / exactly."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)) ** 3
    x[:128] = 1.5  # a constant group
    spec = QuantSpec(granularity=Granularity.GROUP, group_size=128, range="mse")
    p = quantize(x, 3, spec)
    q = quantize(x, 3, QuantSpec(granularity=Granularity.GROUP, group_size=128, range="sigma"))
    assert p.metadata_nbytes == q.metadata_nbytes and p.payload_nbytes == q.payload_nbytes
    y = dequantize(p)
    assert torch.equal(y[:128], x[:128])
    half_step = p.scales.float().repeat_interleave(128)[:1000] / 2
    lo = p.offsets.float().repeat_interleave(128)[:1000]  # type: ignore[union-attr]
    hi = lo + p.scales.float().repeat_interleave(128)[:1000] * 7
    within = (x >= lo) & (x <= hi)  # unclipped elements: round-to-nearest error <= half a step
    assert bool(((y - x).abs()[within] <= half_step[within] * (1 + 1e-3) + 1e-6).all())
    assert ((y - x) ** 2).sum() <= ((dequantize(q) - x) ** 2).sum() * (1 + 1e-5)


def test_row_scales_follow_each_rows_magnitude() -> None:
    """Two-way scaling: rows of very different magnitude (gradients of different tokens) keep the
    same relative error, a zero row decodes to exact zeros, and the row scales are counted."""
    g = torch.Generator().manual_seed(5)
    mags = torch.logspace(-6, -1, 64)
    x = torch.randn(2, 64, 48, generator=g) * mags[:, None] * torch.linspace(1, 3, 48)
    x[1, 7] = 0.0
    spec = QuantSpec(axis=-1, row_scale=True, range="sigma", scale_dtype="float32")
    p = quantize(x, 3, spec)
    assert p.row_scales is not None and p.row_scales.dtype == torch.float16
    assert p.row_scales.shape == (128,) and float(p.row_scales[64 + 7]) == 0.0
    y = dequantize(p)
    assert torch.equal(y[1, 7], torch.zeros(48))
    row_err = ((y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)).reshape(-1)
    row_err = torch.cat([row_err[: 64 + 7], row_err[64 + 8 :]])
    plain = dequantize(quantize(x, 3, QuantSpec(axis=-1, range="sigma", scale_dtype="float32")))
    plain_err = ((plain - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)).reshape(-1)
    assert float(row_err.max()) < 0.35
    assert float(plain_err.max()) > 1.0  # small rows drown in the large rows' step
    base = quantize(x, 3, QuantSpec(axis=-1, range="sigma", scale_dtype="float32"))
    assert p.metadata_nbytes == base.metadata_nbytes + 2 * 128


def test_row_scales_leave_rows_of_equal_rms_unchanged() -> None:
    """With every row at RMS 1 the normalisation is the identity: same codes as without it."""
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    x = x / x.square().mean(dim=1, keepdim=True).sqrt()
    a = quantize(x, 2, QuantSpec(axis=-1, row_scale=True))
    b = quantize(x, 2, QuantSpec(axis=-1))
    assert torch.equal(a.payload, b.payload)
    assert torch.allclose(dequantize(a), dequantize(b), atol=2e-3)


def _massive(seed: int = 3) -> torch.Tensor:
    """[4, 16, 32] with the first token of every sequence 40x the others (an attention sink)."""
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= 40.0
    x[:, 0, 5] = 900.0  # and one massive channel on it, as LLaMA residual streams have
    return x


@pytest.mark.parametrize("two_way", [False, True], ids=["minmax", "sigma+rows"])
def test_outlier_rows_go_as_float16_and_free_the_other_rows(two_way: bool) -> None:
    x = _massive()
    extra: dict = {"range": "sigma", "row_scale": True} if two_way else {}
    p = quantize(x, 3, QuantSpec(axis=-1, outlier_ratio=3.0, **extra))
    assert p.outlier_index is not None and p.outlier_values is not None
    assert p.outlier_index.dtype == torch.int32
    assert p.outlier_index.tolist() == [0, 16, 32, 48]  # the sink rows, nothing else
    assert p.outlier_values.dtype == torch.float16 and p.outlier_values.shape == (4, 32)
    y = dequantize(p)
    assert torch.equal(y[:, 0], x[:, 0].half().float())  # exact up to float16
    plain = dequantize(quantize(x, 3, QuantSpec(axis=-1, **extra)))

    def err(z: torch.Tensor, rows: slice | int) -> float:
        i = (slice(None), rows)
        return float(((z[i] - x[i]) ** 2).sum() / (x[i] ** 2).sum())

    assert err(y, slice(1, None)) < 0.05
    if two_way:  # row scales already serve the other rows; clipping ruined the sinks
        assert err(plain, 0) > 0.1
    else:  # min-max: the sinks set every channel's range, the other rows drown
        assert err(plain, slice(1, None)) > 1.0
    base = quantize(x, 3, QuantSpec(axis=-1, **extra))
    assert p.metadata_nbytes == base.metadata_nbytes + 4 * 4 + 4 * 32 * 2
    assert p.payload_nbytes == base.payload_nbytes  # the kept rows are coded as zeros


def test_no_outlier_rows_means_the_same_tensor_as_without_the_option() -> None:
    x = torch.randn(8, 24, 16, generator=torch.Generator().manual_seed(4))
    for extra in ({}, {"range": "sigma", "row_scale": True}):
        a = quantize(x, 2, QuantSpec(axis=-1, outlier_ratio=3.0, **extra))  # type: ignore[arg-type]
        b = quantize(x, 2, QuantSpec(axis=-1, **extra))  # type: ignore[arg-type]
        assert a.outlier_index is None and a.outlier_values is None
        assert torch.equal(a.payload, b.payload) and torch.equal(dequantize(a), dequantize(b))
        assert a.metadata_nbytes == b.metadata_nbytes


def test_outlier_rows_are_capped_at_an_eighth_of_the_rows_largest_first() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(6))
    x = x / x.square().mean(dim=1, keepdim=True).sqrt()  # every row at RMS 1
    x[:20] *= torch.linspace(10, 200, 20).unsqueeze(1)  # 20 outlier rows, growing
    p = quantize(x, 4, QuantSpec(axis=-1, outlier_ratio=2.0))
    assert p.outlier_index is not None
    assert p.outlier_index.tolist() == list(range(12, 20))  # 64 / 8 = 8 rows, the largest
    assert torch.equal(dequantize(p)[12:20], x[12:20].half().float())


def test_outlier_rows_of_equal_rms_at_the_cap_go_to_the_lower_row_index() -> None:
    """wire-format §11.4: rows tied at the cut are kept lowest index first (not topk's choice)."""
    x = torch.full((16, 32), 0.1)
    big = torch.randn(32, generator=torch.Generator().manual_seed(9)) * 5
    x[[3, 8, 11, 13, 15]] = big  # five identical rows, two places (16 / 8)
    x[6] = big * 2  # one larger row takes the first place
    p = quantize(x, 4, QuantSpec(outlier_ratio=2.0))
    assert p.outlier_index is not None and p.outlier_index.tolist() == [3, 6]


def test_outlier_rows_beyond_float16_and_bad_ratios_are_refused() -> None:
    x = torch.randn(16, 8)
    x[0] = 1e6
    with pytest.raises(CodecError, match="float16"):
        quantize(x, 4, QuantSpec(axis=-1, outlier_ratio=3.0))
    for bad in (0.5, -1.0, float("nan"), float("inf")):
        with pytest.raises(CodecError, match="outlier_ratio"):
            QuantSpec(outlier_ratio=bad)
    with pytest.raises(CodecError, match="at least 1 dim"):
        quantize(torch.tensor(1.0), 4, QuantSpec(outlier_ratio=3.0))


def test_expected_payload_nbytes_needs_one_width_per_block() -> None:
    layout = BlockLayout.build((9, 7), Granularity.GROUP, group_size=5)  # 13 blocks, last of 3
    bm = torch.full((13,), 4, dtype=torch.uint8)
    assert expected_payload_nbytes(layout, bm) == (12 * 5 * 4 + 3 * 4 + 7) // 8 == 32
    with pytest.raises(ValueError, match="13 blocks"):
        expected_payload_nbytes(layout, bm[:12])
    assert expected_payload_nbytes(BlockLayout.build((0, 4), Granularity.TENSOR), bm[:0]) == 0
