"""Fused unpack + dequantize of a format-v3 payload: ``_dequantize_kernel``, its launcher
:func:`dequantize` (and :func:`decode_range` for streaming), and the torch reference
:func:`dequantize_ref` it must match bit for bit.

Design. The kernel reads the payload exactly as it travels, one run (bit-width) per launch,
the width a ``tl.constexpr`` so that every width compiles its own code: extracting a code is a
byte load, a shift and a mask (widths 1, 2, 4 and 8 never straddle a byte; 3, 5, 6 and 7 load a
second byte only for the codes that do). A program takes ``BLOCK`` consecutive codes of its run,
so its payload loads are contiguous; ``t = n // block_len`` (a multiply by a precomputed
:func:`~fedq_kernels.common.magic` number, not a division) names the run's block, the per-run
table maps it to the tensor's block (the identity for a uniform bit map, where the output offset
is the code's own index and stores are contiguous and vectorised), and one gather per element
fetches its block's scale and offset from tables of ``num_blocks`` entries that stay in cache.
The output offset follows the layout: flat for tensor, group and axis-0 channel blocks; ``j * C +
r`` for channel blocks on the last axis (a transpose: stores with stride ``C``); the general
``(pre * C + r) * inner + post`` for a middle axis. Row scales are applied in the same pass; the
few float16 outlier rows are written afterwards by one torch indexed copy, as in the codec.

Arithmetic is the codec's, in its order: float32 ``(q - (2**b - 1) / 2) * s`` or ``q * s + o``
(launched with ``enable_fp_fusion=False`` so the multiply and add are not contracted into an
FMA, which rounds once instead of twice), cast to the output dtype, then ``y * row_scale`` in
float32 and cast again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fedq.codec import reference
from fedq.codec.layout import BlockLayout, Granularity
from fedq.codec.packed import (
    FLOAT_DTYPES,
    FORMAT_VERSION,
    SCALE_DTYPES,
    Encoding,
    PackedTensor,
    dtype_name,
    expected_payload_nbytes,
)
from fedq.codec.runs import Run, payload_runs
from fedq.errors import CodecError
from fedq_kernels.common import check_device, from_f32, magic, supports, to_f32, udiv

#: Codes per program and warps per program.
BLOCK = 1024
NUM_WARPS = 4

#: Output offset modes (``MODE``): flat, channel blocks on the last axis, on a middle axis.
FLAT, CHANNEL_LAST, CHANNEL_MID = 0, 1, 2


@triton.jit
def _code(payload_ptr, bit, mask, BITS: tl.constexpr):
    """The ``BITS``-bit code starting at stream bit ``bit`` (LSB-first), as int32."""
    byte = bit >> 3
    lo = tl.load(payload_ptr + byte, mask=mask, other=0).to(tl.int32)
    if BITS == 8:
        q = lo
    elif (8 % BITS) == 0:  # 1, 2, 4: a code never straddles a byte
        q = (lo >> (bit & 7)) & ((1 << BITS) - 1)
    else:
        sh = bit & 7
        hi = tl.load(payload_ptr + byte + 1, mask=mask & (sh + BITS > 8), other=0).to(tl.int32)
        q = ((lo | (hi << 8)) >> sh) & ((1 << BITS) - 1)
    return q


#: Integer arguments whose value Triton should not specialise on (divisibility by 16, == 1):
#: they are bounds and constants, not addresses, and each specialisation is another compile.
_PLAIN_INTS = [
    "stop",
    "bit_base",
    "block_len",
    "bl_m",
    "bl_s",
    "inner",
    "in_m",
    "in_s",
    "row_m",
    "row_s",
]


@triton.jit(do_not_specialize=_PLAIN_INTS)
def _dequantize_kernel(
    payload_ptr,
    out_ptr,
    blocks_ptr,
    scale_ptr,
    offset_ptr,
    row_scale_ptr,
    start,
    stop,
    bit_base,
    block_len,
    bl_m,
    bl_s,
    channels,
    inner,
    in_m,
    in_s,
    row_m,
    row_s,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    ALL_BLOCKS: tl.constexpr,
    MODE: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = start + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # codes of this run
    mask = n < stop
    q = _code(payload_ptr, bit_base + n * BITS, mask, BITS).to(tl.float32)
    t = udiv(n, bl_m, bl_s)  # the run's t-th block is the tensor's block r
    r = t if ALL_BLOCKS else tl.load(blocks_ptr + t, mask=mask, other=0)
    j = n - t * block_len
    s = tl.load(scale_ptr + r, mask=mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        v = (q - ((1 << BITS) - 1) / 2) * s
    else:
        v = q * s + tl.load(offset_ptr + r, mask=mask, other=0.0).to(tl.float32)
    y = from_f32(v, out_ptr.dtype.element_ty)
    if MODE == 0:
        o = n if ALL_BLOCKS else r * block_len + j
    elif MODE == 1:
        o = j * channels + r
    else:
        pre = udiv(j, in_m, in_s)
        o = (pre * channels + r) * inner + (j - pre * inner)
    if ROW_SCALE:
        row = j if MODE == 1 else udiv(o, row_m, row_s)
        rs = tl.load(row_scale_ptr + row, mask=mask, other=0.0).to(tl.float32)
        y = from_f32(to_f32(y) * rs, out_ptr.dtype.element_ty)
    tl.store(out_ptr + o, y, mask=mask)


@dataclass(frozen=True, eq=False)
class DecodePlan:
    """What decoding tensors of one header needs on the device: the runs, each run's block table
    (None where it holds every block), scales and offsets, and the output offset mode with its
    division constants. Build once per header; decode as many ranges as wanted."""

    layout: BlockLayout
    symmetric: bool
    device: torch.device
    runs: list[Run]
    blocks: list[torch.Tensor | None]
    scales: torch.Tensor
    offsets: torch.Tensor | None
    mode: int
    channels: int
    inner: int
    last_dim: int

    @staticmethod
    def build(p: PackedTensor, device: torch.device | str) -> DecodePlan:
        dev = torch.device(device)
        _check_header(p, dev)
        layout = p.layout
        runs = payload_runs(layout, p.bits)
        blocks = [
            None if run.all_blocks else run.blocks.to(device=dev, dtype=torch.int32) for run in runs
        ]
        mode, channels, inner = FLAT, 1, 1
        shape = layout.shape
        if layout.granularity is Granularity.CHANNEL and len(shape) >= 2 and layout.axis > 0:
            channels = shape[layout.axis]
            inner = math.prod(shape[layout.axis + 1 :])
            mode = CHANNEL_LAST if layout.axis == len(shape) - 1 else CHANNEL_MID
        offsets = None if p.offsets is None else p.offsets.to(dev)
        return DecodePlan(
            layout,
            p.symmetric,
            dev,
            runs,
            blocks,
            p.scales.to(dev),
            offsets,
            mode,
            channels,
            inner,
            shape[-1] if shape else 1,
        )


def _check_header(p: PackedTensor, device: torch.device) -> None:
    """Everything but the payload and the row steps: the header must be one the codec writes."""
    if p.encoding is not Encoding.QUANTIZED:
        raise CodecError("fedq_kernels decode QUANTIZED tensors; use fedq.codec.dequantize for RAW")
    if p.version != FORMAT_VERSION:
        raise CodecError(f"fedq_kernels read format v{FORMAT_VERSION}, got v{p.version}")
    check_device(device)
    layout = p.layout
    if not supports(layout.numel):
        raise CodecError(f"{layout.numel} elements exceeds the kernels' limit; use the torch path")
    nb = layout.num_blocks
    bits = p.bits.reshape(-1)
    if bits.numel() != nb or (nb and (int(bits.min()) < 1 or int(bits.max()) > 8)):
        raise CodecError(f"bit map must have {nb} entries in 1..8")
    if p.scales.dtype not in SCALE_DTYPES.values() or p.scales.numel() != nb:
        raise CodecError(
            f"scales must be {nb} float16/float32 values, got {p.scales.dtype} "
            f"{list(p.scales.shape)}"
        )
    if p.symmetric != (p.offsets is None):
        raise CodecError("offsets must be given exactly for asymmetric tensors")
    if p.offsets is not None and (
        p.offsets.dtype not in SCALE_DTYPES.values() or p.offsets.numel() != nb
    ):
        raise CodecError(f"offsets must be {nb} float16/float32 values")


def _check_rows(p: PackedTensor) -> None:
    shape = p.shape
    rows = math.prod(shape[:-1]) if shape else 0
    if p.row_scales is not None and (not shape or p.row_scales.numel() != rows):
        raise CodecError(f"row_scales must have {rows} entries (one per row of the last dim)")
    if p.outlier_index is not None or p.outlier_values is not None:
        if p.outlier_index is None or p.outlier_values is None or not shape:
            raise CodecError("outlier_index and outlier_values go together")
        k = p.outlier_index.numel()
        if p.outlier_values.numel() != k * shape[-1]:
            raise CodecError(f"outlier_values must be [{k}, {shape[-1]}]")


def decode_range(
    plan: DecodePlan,
    payload: torch.Tensor,
    out: torch.Tensor,
    run: int,
    start: int,
    stop: int,
    row_scales: torch.Tensor | None = None,
) -> None:
    """Decode codes ``[start, stop)`` of run number ``run`` of ``payload`` (uint8, on the plan's
    device; only the bytes those codes span are read) into their places in ``out`` (contiguous,
    the tensor's shape), applying ``row_scales`` (float16, on the device) when given."""
    r = plan.runs[run]
    if not 0 <= start <= stop <= r.numel:
        raise CodecError(f"code range [{start}, {stop}) outside run of {r.numel} codes")
    if stop == start:
        return
    lay = plan.layout
    bl_m, bl_s = magic(lay.block_len)
    in_m, in_s = magic(plan.inner)
    row_m, row_s = magic(plan.last_dim)
    table = plan.blocks[run]
    grid = (triton.cdiv(stop - start, BLOCK),)
    _dequantize_kernel[grid](
        payload,
        out,
        plan.scales if table is None else table,
        plan.scales,
        plan.scales if plan.offsets is None else plan.offsets,
        plan.scales if row_scales is None else row_scales,
        start,
        stop,
        8 * r.byte_start,
        lay.block_len,
        bl_m,
        bl_s,
        plan.channels,
        plan.inner,
        in_m,
        in_s,
        row_m,
        row_s,
        BITS=r.bits,
        SYMMETRIC=plan.symmetric,
        ALL_BLOCKS=r.all_blocks,
        MODE=plan.mode,
        ROW_SCALE=row_scales is not None,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


def dequantize(
    p: PackedTensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    plan: DecodePlan | None = None,
) -> torch.Tensor:
    """Decode ``p`` on ``device`` (default: where its payload is) into a tensor of ``dtype``
    (default: ``p.dtype``), bit-identical to :func:`fedq.codec.dequantize`. A ``plan`` built
    for ``p``'s header (:meth:`DecodePlan.build`) saves rebuilding the tables."""
    dev = torch.device(device) if device is not None else p.payload.device
    out_dtype = FLOAT_DTYPES[p.dtype] if dtype is None else dtype
    dtype_name(out_dtype)
    plan = plan or DecodePlan.build(p, dev)
    _check_rows(p)
    need = expected_payload_nbytes(plan.layout, p.bits)
    if p.payload.dtype != torch.uint8 or p.payload.dim() != 1 or p.payload.numel() != need:
        raise CodecError(
            f"payload must be {need} uint8 bytes, got {p.payload.dtype} {list(p.payload.shape)}"
        )
    out = torch.empty(p.shape, dtype=out_dtype, device=dev)
    if plan.layout.numel == 0:
        return out
    payload = p.payload.to(dev)
    rs = None if p.row_scales is None else p.row_scales.to(dev)
    flat = out.view(-1)
    for i, run in enumerate(plan.runs):
        decode_range(plan, payload, flat, i, 0, run.numel, rs)
    if p.outlier_index is not None and p.outlier_values is not None:
        rows = out.view(-1, p.shape[-1])
        idx = p.outlier_index.to(device=dev, dtype=torch.int64)
        rows[idx] = p.outlier_values.to(device=dev, dtype=out_dtype).view(-1, p.shape[-1])
    return out


def dequantize_ref(
    p: PackedTensor, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The definition: the codec's torch path (decoding as if ``p`` had been sent as ``dtype``)."""
    if dtype is not None:
        p = dataclasses.replace(p, dtype=dtype_name(dtype))
    return reference.dequantize(p, device=device)
