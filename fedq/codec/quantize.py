"""Quantize / dequantize maths: per-tensor, per-channel or per-group blocks, symmetric or
asymmetric, round-to-nearest or unbiased stochastic rounding, one bit-width per block (1..8).

Choices, each with its reason in docs/algorithms.md §5 (measurements in BENCHMARKS.md, "Codec"
and "Split learning"); the exact decode arithmetic is specified in docs/wire-format.md:

- asymmetric blocks: min-max with a float offset, ``x_hat = q * scale + offset`` (§5.1);
- symmetric blocks: mid-rise levels ``x_hat = scale * (q - (2**b - 1) / 2)``, so 1 bit is sign
  quantization (§5.2);
- scales rounded up and offsets down to their storage dtype before coding, so the half-step
  error bound holds for what the receiver decodes (§5.3);
- stochastic rounding ``q = floor(v + u)``, ``u ~ U[0, 1)``, unbiased: on the CPU ``u`` comes from
  the caller's generator in element order; on other devices (and wherever a ``seed`` is given)
  from the counter-based noise of :mod:`fedq.codec.noise`, which the GPU kernels reproduce;
- tensors on a CUDA device are coded and decoded by the Triton kernels of ``fedq_kernels`` when
  they are available, bit-identically (:mod:`fedq.codec.dispatch` states the rules);
- encoder-only range options for asymmetric blocks: ``range="sigma"`` clips to the
  Gaussian-optimal ``mean +- k_b std`` (§5.6), ``range="mse"`` picks per block the least-error
  range among wider clips and min-max (§5.7);
- ``row_scale=True``: each row of the last dimension divided by its float16 RMS first, which is
  sent ("two-way" scaling, format version 2, §5.8);
- ``outlier_ratio=t``: rows with RMS above ``t`` times the median row's travel as float16 rows
  beside the codes (format version 3, §5.9);
- zero-range blocks get scale 0 and decode exactly; zero rows get row scale 0; NaN / Inf inputs
  raise :class:`~fedq.errors.CodecError`, and so does a finite block whose scale or offset
  overflows its storage dtype (float16: a range beyond about 65504 x (2**b - 1)), so no payload
  ever carries a value its receiver refuses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from fedq.codec import dispatch, reference
from fedq.codec.layout import BlockLayout, Granularity, Piece
from fedq.codec.noise import draw_seed
from fedq.codec.packed import (
    FLOAT_DTYPES,
    MAX_OUTLIER_FRACTION,
    OUTLIER_INDEX_DTYPE,
    OUTLIER_VALUE_DTYPE,
    ROW_SCALE_DTYPE,
    SCALE_DTYPES,
    Encoding,
    PackedTensor,
    dtype_name,
)
from fedq.codec.reference import PIECE_ELEMS, encode_blocks, pack_by_class, unpack_by_class
from fedq.errors import CodecError

#: Shortest channel kept per-channel by :meth:`QuantSpec.layout_for`; shorter ones use groups.
MIN_CHANNEL_BLOCK = 16

#: ``range="sigma"``: half-width in standard deviations of the MSE-optimal uniform quantizer with
#: ``2**b`` levels for a Gaussian source (levels at ``mean +- k``; Max 1960, recomputed by
#: numerical minimisation: MSE 0.363, 0.119, 0.037, 0.012 of the variance at 1-4 bits).
SIGMA_CLIP: dict[int, float] = {
    1: 0.798,
    2: 1.494,
    3: 2.051,
    4: 2.514,
    5: 2.916,
    6: 3.278,
    7: 3.611,
    8: 3.922,
}

#: ``range="mse"``: the candidate half-widths, as multiples of :data:`SIGMA_CLIP`'s (``inf``:
#: min-max). Heavy-tailed blocks (an LLM's residual stream) want wider ranges than a Gaussian.
MSE_CLIP_FACTORS: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0, float("inf"))
#: ``range="mse"``: a longer block's rounding error is estimated on a strided sample of this many
#: of its values (its clipping error is exact), which keeps the search cheap: on a split cut's
#: [32, 64, 384] tensor, scoring every value would triple the coding time.
MSE_SEARCH_SAMPLES = 256


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """How to cut and code a tensor (everything except the bit-widths)."""

    granularity: Granularity = Granularity.CHANNEL
    axis: int = 0
    group_size: int = 128
    symmetric: bool = False
    stochastic: bool = False
    scale_dtype: str = "float16"
    range: Literal["minmax", "sigma", "mse"] = "minmax"  # how an asymmetric block's range is chosen
    row_scale: bool = False  # divide each row of the last dim by its RMS first (float16, sent)
    outlier_ratio: float = 0.0  # > 0: rows with RMS > ratio * median row RMS go as float16

    def __post_init__(self) -> None:
        if self.scale_dtype not in SCALE_DTYPES:
            raise CodecError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}")
        if self.range not in ("minmax", "sigma", "mse"):
            raise CodecError(f"range must be 'minmax', 'sigma' or 'mse', got {self.range!r}")
        if self.range != "minmax" and self.symmetric:
            raise CodecError(f"range={self.range!r} needs asymmetric blocks (symmetric=False)")
        if not (self.outlier_ratio == 0 or 1 <= self.outlier_ratio < float("inf")):
            raise CodecError(f"outlier_ratio must be 0 (off) or >= 1, got {self.outlier_ratio}")
        if self.granularity is Granularity.GROUP and self.group_size <= 0:
            raise CodecError(f"group_size must be positive, got {self.group_size}")

    def layout_for(self, shape: tuple[int, ...], *, bit_map: bool = False) -> BlockLayout:
        """The block layout used for a tensor of ``shape``.

        Per-channel degrades where its metadata would cost more than it saves: a 0-d/1-d tensor
        goes per-tensor, and channels shorter than :data:`MIN_CHANNEL_BLOCK` elements (e.g. the
        [out, r] LoRA ``B`` matrices, 8 values per row at r=8, where 5 bytes of scale, offset and
        width per row would outweigh 4 bytes of 4-bit codes) go to groups of ``group_size``,
        unless the caller passes its own per-channel ``bit_map`` (then the channels are the blocks
        it chose). The packed tensor records the layout used, so decoding needs nothing else.
        """
        gran = self.granularity
        if gran is Granularity.CHANNEL and len(shape) < 2:
            gran = Granularity.TENSOR
        elif gran is Granularity.CHANNEL and not bit_map:
            numel = 1
            for d in shape:
                numel *= d
            channels = shape[self.axis]
            if channels and numel // channels < MIN_CHANNEL_BLOCK:
                gran = Granularity.GROUP
        return BlockLayout.build(shape, gran, axis=self.axis, group_size=self.group_size)


def _bit_map(bits: int | torch.Tensor, num_blocks: int) -> torch.Tensor:
    if isinstance(bits, int):
        if not 1 <= bits <= 8:
            raise CodecError(f"bit-width must be in 1..8, got {bits}")
        return torch.full((num_blocks,), bits, dtype=torch.uint8)
    bm = bits.detach().to("cpu").reshape(-1)
    if bm.is_floating_point():
        raise CodecError("bit map must be integer (fractional bits are never transmitted)")
    if bm.numel() != num_blocks:
        raise CodecError(f"bit map has {bm.numel()} entries for {num_blocks} blocks")
    if bm.numel() and (int(bm.min()) < 1 or int(bm.max()) > 8):
        raise CodecError(f"bit map values must be in 1..8, got [{int(bm.min())}, {int(bm.max())}]")
    return bm.to(torch.uint8)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    low = y.float() < x
    if bool(low.any()):
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    high = y.float() > x
    if bool(high.any()):
        y = torch.where(high, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)
    return y


#: Elements per working piece of the [num_blocks, block_len] view (tests shrink it).
_PIECE_ELEMS = PIECE_ELEMS
#: The private names the codec's tests reach for.
_pack_by_class = pack_by_class
_unpack_by_class = unpack_by_class


def _block_min_max(xb: torch.Tensor, pieces: list[Piece]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (min, max) per block in one cache-friendly pass (NaN propagates)."""
    parts = max(k for _, _, k in pieces) + 1
    lo = torch.empty((xb.shape[0], parts), dtype=xb.dtype, device=xb.device)
    hi = torch.empty_like(lo)
    for rows, cols, k in pieces:
        piece = xb[rows, cols]
        torch.amin(piece, dim=1, out=lo[rows, k])
        torch.amax(piece, dim=1, out=hi[rows, k])
    return lo.amin(dim=1).float(), hi.amax(dim=1).float()


def _block_mean_std(xb: torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (mean, std) over the real elements of each block (a partial last group's padding
    excluded)."""
    lens = layout.block_lengths().to(device=xb.device, dtype=torch.float32)
    x = xb.float()
    if layout.padding:
        x = x.clone()
        x[-1, layout.last_len :] = 0.0
    mean = x.sum(dim=1) / lens.clamp(min=1)
    var = (x.square().sum(dim=1) / lens.clamp(min=1) - mean.square()).clamp(min=0.0)
    return mean, var.sqrt()


def _clip(
    lo: torch.Tensor, hi: torch.Tensor, mean: torch.Tensor, half: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's range ``[lo, hi]`` narrowed to ``mean +- half``."""
    return torch.maximum(lo, mean - half), torch.minimum(hi, mean + half)


def _mse_range(
    xb: torch.Tensor,
    layout: BlockLayout,
    lo: torch.Tensor,
    hi: torch.Tensor,
    mean: torch.Tensor,
    half: torch.Tensor,
    levels: torch.Tensor,
    sdt: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``range="mse"``: per block, the candidate range ``mean +- f * half`` (``f`` in
    :data:`MSE_CLIP_FACTORS`, ``inf`` = min-max) whose round-to-nearest reconstruction, with scale
    and offset rounded to ``sdt`` as sent, has the smallest squared error over the block.

    A block of at most :data:`MSE_SEARCH_SAMPLES` values is scored exactly. A longer one is scored
    as the sum of its rounding error, estimated on a strided sample of that many values (scaled
    to the block), and its clipping error ``sum (x - clamp(x))^2``, computed exactly over the
    values outside the narrowest candidate (the tails that decide the choice, and which a sample
    would miss)."""
    nb, n = xb.shape
    step = -(-n // MSE_SEARCH_SAMPLES)
    x = xb.float()
    real = torch.full((nb,), float(n), device=x.device)
    if layout.padding:  # the last group's padding repeats its last element: not a real value
        real[-1] = float(layout.last_len)
    xs = x[:, ::step]
    in_sample = (torch.arange(xs.shape[1], device=x.device) * step).unsqueeze(0) < real.unsqueeze(1)
    scale_up = real / in_sample.sum(dim=1).float()
    if step > 1:  # the tails, exactly: values outside the narrowest candidate range
        n_lo, n_hi = _clip(lo, hi, mean, MSE_CLIP_FACTORS[0] * half)
        tail = (x < n_lo.unsqueeze(1)) | (x > n_hi.unsqueeze(1))
        if layout.padding:
            tail[-1, layout.last_len :] = False
        t_blk, t_col = tail.nonzero(as_tuple=True)
        t_val = x[t_blk, t_col]
    top = levels.unsqueeze(1)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for f in MSE_CLIP_FACTORS:
        c_lo, c_hi = (lo, hi) if f == float("inf") else _clip(lo, hi, mean, f * half)
        off = _round_down(c_lo, sdt).float().unsqueeze(1)
        sc = _round_up((c_hi - off.squeeze(1)) / levels, sdt).float()
        s = torch.where(sc > 0, sc, 1.0).unsqueeze(1)
        # exact blocks: the error against x itself; sampled ones: against the clamped value
        ref = xs if step == 1 else xs.clamp(c_lo.unsqueeze(1), c_hi.unsqueeze(1))
        recon = torch.clamp(torch.round((xs - off) / s), min=0.0).minimum(top) * s + off
        err = ((recon - ref).square_() * in_sample).sum(dim=1) * scale_up
        if step > 1:
            err.index_add_(0, t_blk, (t_val - t_val.clamp(c_lo[t_blk], c_hi[t_blk])).square_())
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


def _row_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float16 RMS of each row of the last dim, x divided by it)``; zero rows stay zero."""
    rows = x.reshape(-1, x.shape[-1]).float()
    r = rows.square().mean(dim=1).sqrt().to(ROW_SCALE_DTYPE)
    if not bool(torch.isfinite(r).all()):
        if not bool(torch.isfinite(rows).all()):
            raise CodecError("cannot quantize a tensor containing NaN or Inf")
        raise CodecError(
            f"a row's RMS overflows the {dtype_name(ROW_SCALE_DTYPE)} row scales "
            f"(largest {float(torch.finfo(ROW_SCALE_DTYPE).max):.4g}): turn "
            "row_scale off or bring the values into range"
        )
    rf = r.float()
    div = torch.where(rf > 0, rf, torch.ones_like(rf)).unsqueeze(1)
    return r, (rows / div).reshape(x.shape)


def _outlier_rows(
    x: torch.Tensor, ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Rows of the last dim with RMS above ``ratio`` x the median row RMS (at most
    :data:`MAX_OUTLIER_FRACTION` of them, the largest first, ties to the lower row index, so the
    choice is the document's, wire-format §11.4): ``(int32 sorted indices, float16
    values, x with those rows zeroed)``, or None when there are none."""
    rows = x.reshape(-1, x.shape[-1])
    rms = rows.float().square().mean(dim=1).sqrt()
    if not bool(torch.isfinite(rms).all()):
        if not bool(torch.isfinite(rows).all()):
            raise CodecError("cannot quantize a tensor containing NaN or Inf")
        raise CodecError("a row's RMS overflows float32: bring the values into range")
    cand = (rms > ratio * rms.median()).nonzero().squeeze(1)
    cap = int(rows.shape[0] * MAX_OUTLIER_FRACTION)
    if cand.numel() > cap:  # the largest RMS first; of equal ones, the lower row index
        cand = cand[rms[cand].sort(descending=True, stable=True).indices[:cap]]
    if cand.numel() == 0:
        return None
    idx = cand.sort().values
    values = rows[idx].to(OUTLIER_VALUE_DTYPE)
    if not bool(torch.isfinite(values).all()):
        raise CodecError("an outlier row exceeds the float16 range")
    rest = rows.clone()
    rest[idx] = 0
    return idx.to(OUTLIER_INDEX_DTYPE).cpu(), values.cpu(), rest.reshape(x.shape)


def quantize(
    x: torch.Tensor,
    bits: int | torch.Tensor,
    spec: QuantSpec | None = None,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> PackedTensor:
    """Quantize and pack ``x`` at ``bits`` (an int, or a uint8 bit map with one entry per block).

    Stochastic rounding noise: with ``seed``, the counter-based noise of that seed
    (:mod:`fedq.codec.noise`); without, on the CPU the stream of ``generator`` and elsewhere the
    counter-based noise of a seed drawn from ``generator`` (from the device's default generator
    when None)."""
    spec = spec or QuantSpec()
    dtype_name(x.dtype)  # rejects unsupported dtypes before any work
    layout = spec.layout_for(tuple(x.shape), bit_map=not isinstance(bits, int))
    bm = _bit_map(bits, layout.num_blocks)
    sdt = SCALE_DTYPES[spec.scale_dtype]
    if (spec.row_scale or spec.outlier_ratio) and x.dim() == 0:
        raise CodecError("row_scale and outlier_ratio need a tensor with at least 1 dim")
    kernels = dispatch.kernels_for(x.device, layout.numel)
    if spec.stochastic and seed is None and (kernels is not None or x.device.type != "cpu"):
        seed = draw_seed(generator, x.device)
    if layout.numel == 0:
        empty = torch.empty(0, dtype=sdt)  # no rows to scale either: row_scales stays None
        return _packed(
            x,
            spec,
            layout,
            bm,
            empty,
            None if spec.symmetric else empty.clone(),
            torch.empty(0, dtype=torch.uint8),
            None,
        )
    row_scales = None
    src = x.detach()
    outliers = _outlier_rows(src, spec.outlier_ratio) if spec.outlier_ratio else None
    if outliers is not None:
        src = outliers[2]
    if spec.row_scale:
        row_scales, src = _row_scales(src)
    xb = layout.to_blocks(src)  # -> [num_blocks, block_len], input dtype
    pieces = layout.pieces(_PIECE_ELEMS)
    lo, hi = _block_min_max(xb, pieces)
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise CodecError("cannot quantize a tensor containing NaN or Inf")
    levels = (2 ** bm.to(device=xb.device, dtype=torch.int32) - 1).float()  # [num_blocks]
    if spec.range != "minmax":
        mean, std = _block_mean_std(xb, layout)
        k = torch.tensor([0.0] + [SIGMA_CLIP[b] for b in range(1, 9)], device=xb.device)
        half = k[bm.to(device=xb.device, dtype=torch.int64)] * std
        if spec.range == "sigma":
            lo, hi = _clip(lo, hi, mean, half)
        else:
            lo, hi = _mse_range(xb, layout, lo, hi, mean, half, levels, sdt)
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = _round_up(2.0 * amax / levels, sdt)
        offset = None
        centre = levels / 2
    else:
        offset = _round_down(lo, sdt)
        scale = _round_up((hi - offset.float()) / levels, sdt)
        centre = offset.float()
    _check_storable(scale, offset, lo, hi, bm, spec.scale_dtype)
    s = scale.float()
    divisor = torch.where(s > 0, s, 1.0)  # scale 0 (zero range): every code decodes exactly
    if kernels is not None:  # the fused code + pack kernel (same bytes)
        payload = kernels.quantize_pack(
            xb,
            bm,
            layout,
            divisor,
            centre,
            symmetric=spec.symmetric,
            seed=seed if spec.stochastic else None,
        )
    else:
        codes = encode_blocks(
            xb,
            pieces,
            divisor,
            centre,
            levels,
            symmetric=spec.symmetric,
            stochastic=spec.stochastic,
            generator=generator,
            seed=seed,
        )
        payload = pack_by_class(codes, bm, layout)
    p = _packed(
        x,
        spec,
        layout,
        bm,
        scale.cpu(),
        None if offset is None else offset.cpu(),
        payload,
        None if row_scales is None else row_scales.cpu(),
    )
    if outliers is None:
        return p
    return dataclasses.replace(p, outlier_index=outliers[0], outlier_values=outliers[1])


def _check_storable(
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bm: torch.Tensor,
    scale_dtype: str,
) -> None:
    """Raise :class:`CodecError` unless every scale and offset is finite in ``scale_dtype``: with
    float16, a finite block beyond what it holds (a range over about 65504 x (2**b - 1), a minimum
    below -65504, or, symmetric, a magnitude over about 65504 x (2**b - 1) / 2) would get an
    infinite scale or offset, and every receiver refuses such a tensor ('scales contain NaN or
    Inf'). Checks only the per-block metadata; the bytes of every other input are unchanged."""
    ok = torch.isfinite(scale)
    if offset is not None:
        ok &= torch.isfinite(offset)
    if bool(ok.all()):
        return
    j = int((~ok).nonzero()[0, 0])
    b = int(bm[j])
    top = float(torch.finfo(SCALE_DTYPES[scale_dtype]).max)
    levels = 2**b - 1
    if scale_dtype == "float32":  # (hi - offset) or 2 |x| overflows in the float32 maths itself
        fits = f"|x| <= {top / 2:.4g}" if offset is None else f"range <= {top:.4g}"
    elif offset is None:  # symmetric: the scale spans twice the largest magnitude
        fits = f"|x| <= about {top * levels / 2:.4g}"
    else:  # the offset must hold the minimum (rounded down); the scale the rest of the range
        fits = f"min >= -{top:.4g}, max <= {top * (levels + 1):.4g}, range <= {top * levels:.4g}"
    what = "offset" if offset is not None and not bool(torch.isfinite(offset[j])) else "scale"
    advice = (
        "use scale_dtype: float32 for this link (compression config) or smaller values"
        if scale_dtype != "float32"
        else "bring the values into range"
    )
    raise CodecError(
        f"block {j} spans [{float(lo[j]):.4g}, {float(hi[j]):.4g}]: its {what} overflows "
        f"{scale_dtype}, which at {b} bits carries {fits}; {advice}"
    )


def _packed(
    x: torch.Tensor,
    spec: QuantSpec,
    layout: BlockLayout,
    bm: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    payload: torch.Tensor,
    row_scales: torch.Tensor | None,
) -> PackedTensor:
    return PackedTensor(
        shape=tuple(x.shape),
        dtype=dtype_name(x.dtype),
        encoding=Encoding.QUANTIZED,
        granularity=layout.granularity,
        axis=layout.axis,
        group_size=layout.group_size,
        symmetric=spec.symmetric,
        scale_dtype=spec.scale_dtype,
        bits=bm.cpu(),
        scales=scales,
        offsets=offsets,
        payload=payload.cpu(),  # a PackedTensor is the wire form: it always lives on the CPU
        row_scales=row_scales,
    )


def dequantize(p: PackedTensor, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Decode a :class:`PackedTensor` to a tensor of its original shape and dtype."""
    dev = torch.device(device) if device is not None else p.payload.device
    numel = p.layout.numel if p.encoding is not Encoding.RAW and p.dtype in FLOAT_DTYPES else 0
    if numel:  # else the torch path (it raises on an unknown dtype)
        kernels = dispatch.kernels_for(dev, numel)
        if kernels is not None:  # the fused unpack + dequantize kernel (same values)
            out: torch.Tensor = kernels.dequantize(p, device=dev)
            return out
    return reference.dequantize(p, device=dev, piece_elems=_PIECE_ELEMS)


def raw(x: torch.Tensor) -> PackedTensor:
    """Encode ``x`` losslessly in its own dtype (identity codec / uncompressed baseline)."""
    name = dtype_name(x.dtype)
    flat = x.detach().contiguous().reshape(-1)
    payload = torch.empty(0, dtype=torch.uint8)
    if flat.numel():  # a PackedTensor is the wire form: it always lives on the CPU
        payload = flat.view(torch.uint8).to("cpu", copy=True)  # one copy from any device
    none = torch.empty(0)
    return PackedTensor(
        tuple(x.shape),
        name,
        Encoding.RAW,
        Granularity.TENSOR,
        0,
        0,
        False,
        "float32",
        torch.empty(0, dtype=torch.uint8),
        none,
        None,
        payload,
    )
