"""Fused quantize + pack into a format-v3 payload: ``_quantize_pack_kernel``, its launcher
:func:`quantize_pack` and the torch reference :func:`quantize_pack_ref` it must match byte for
byte.

Scope: the kernel codes and packs. What precedes it stays in torch (``fedq.codec.quantize``):
outlier rows, row scales (the blocks' ranges are taken over the row-normalised values, so torch
materialises them once), the per-block ranges (min-max, and the ``sigma`` / ``mse`` searches)
and the rounded scales and offsets, all reductions or per-block work. The kernel reads the block
view and the per-block divisor and centre and writes the payload bytes directly: the codes never
exist in memory.

Design. One launch per run (bit-width, a ``tl.constexpr``). A program owns ``BYTES``
consecutive payload bytes of its run, so no two programs write the same byte and no atomics are
needed: byte ``k`` holds bits ``[8k, 8k + 8)`` of the run, i.e. codes ``8k // b`` up to ``E - 1``
after it (``E``, the most codes that can touch one byte, is 8 / b for b in 1, 2, 4, 8 and a
power of two above it for odd widths, whose straddling codes are computed by both bytes). The
program computes a ``[BYTES, E]`` tile of codes, shifts each into its place in the byte and sums
the tile's rows (the fields are disjoint, so the sum is the bitwise or). Reads of the input are
contiguous for a uniform bit map. The maths is the codec's: float32 ``x / s + c`` (symmetric) or
``(x - c) / s`` with IEEE division (``tl.math.div_rn``; Triton's ``/`` is approximate on the
GPU), then round half to even, or ``floor(v + u)`` with the counter-based noise ``u`` of
:mod:`fedq.codec.noise` for stochastic rounding, then clamp to ``[0, 2**b - 1]``; launched
without FMA contraction, as the decoder is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedq.codec.layout import BlockLayout
from fedq.codec.packed import FLOAT_DTYPES, expected_payload_nbytes
from fedq.codec.reference import PIECE_ELEMS, encode_blocks, pack_by_class
from fedq.codec.runs import payload_runs
from fedq.errors import CodecError
from fedq_kernels.common import (
    check_device,
    counter_uniform,
    magic,
    round_half_even,
    seed_args,
    supports,
    to_f32,
    udiv,
)

#: Codes per program (a tile of ``BYTES = TILE // E`` bytes by ``E`` codes) and warps.
TILE = 2048
NUM_WARPS = 4


def codes_per_byte(bits: int) -> int:
    """``E``: the most codes of a ``bits``-bit run that touch one byte, rounded up to a power
    of two (``tl.arange`` needs one)."""
    most = max((8 * k + 7) // bits - (8 * k) // bits + 1 for k in range(bits))
    return triton.next_power_of_2(most)


#: Integer arguments whose value Triton should not specialise on (each specialisation is another
#: compile; only ``byte_base``, the store address, gains from it).
_PLAIN_INTS = ["run_len", "run_nbytes", "block_len", "bl_m", "bl_s", "seed_lo", "seed_hi"]


@triton.jit(do_not_specialize=_PLAIN_INTS)
def _quantize_pack_kernel(
    x_ptr,
    out_ptr,
    blocks_ptr,
    divisor_ptr,
    centre_ptr,
    run_len,
    run_nbytes,
    byte_base,
    block_len,
    bl_m,
    bl_s,
    seed_lo,
    seed_hi,
    BITS: tl.constexpr,
    E: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALL_BLOCKS: tl.constexpr,
    BYTES: tl.constexpr,
):
    k = tl.program_id(0) * BYTES + tl.arange(0, BYTES)  # bytes of this run
    kmask = k < run_nbytes
    first_bit = (k * 8)[:, None]
    n = ((k * 8) // BITS)[:, None] + tl.arange(0, E)[None, :]  # codes touching byte k
    nbit = n * BITS
    m = kmask[:, None] & (n < run_len) & (nbit < first_bit + 8)
    t = udiv(n, bl_m, bl_s)
    r = t if ALL_BLOCKS else tl.load(blocks_ptr + t, mask=m, other=0)
    idx = n if ALL_BLOCKS else r * block_len + (n - t * block_len)  # in the block view
    x = to_f32(tl.load(x_ptr + idx, mask=m, other=0.0))
    s = tl.load(divisor_ptr + r, mask=m, other=1.0)
    c = tl.load(centre_ptr + r, mask=m, other=0.0)
    v = tl.math.div_rn(x, s) + c if SYMMETRIC else tl.math.div_rn(x - c, s)
    u = counter_uniform(idx, seed_lo, seed_hi) if STOCHASTIC else 0.0
    v = tl.floor(v + u) if STOCHASTIC else round_half_even(v)
    code = tl.minimum(tl.maximum(v, 0.0), (1 << BITS) - 1.0).to(tl.int32)
    sh = nbit - first_bit  # where the code starts relative to the byte (< 0: in an earlier one)
    part = tl.where(sh >= 0, code << tl.maximum(sh, 0), code >> tl.maximum(-sh, 0)) & 0xFF
    byte = tl.sum(tl.where(m, part, 0), axis=1)
    tl.store(out_ptr + byte_base + k, byte.to(tl.uint8), mask=kmask)


def _check(
    xb: torch.Tensor,
    bits: torch.Tensor,
    layout: BlockLayout,
    divisor: torch.Tensor,
    centre: torch.Tensor,
) -> None:
    nb, bl = layout.num_blocks, layout.block_len
    if xb.dtype not in FLOAT_DTYPES.values() or tuple(xb.shape) != (nb, bl):
        raise CodecError(
            f"quantize_pack: x must be the [{nb}, {bl}] block view in "
            f"float32/float16/bfloat16, got {xb.dtype} {list(xb.shape)}"
        )
    check_device(xb.device)
    if not supports(layout.numel):
        raise CodecError(f"{layout.numel} elements exceeds the kernels' limit; use the torch path")
    flat = bits.reshape(-1)
    if flat.numel() != nb or (nb and (int(flat.min()) < 1 or int(flat.max()) > 8)):
        raise CodecError(f"quantize_pack: bit map must have {nb} entries in 1..8")
    for name, t in (("divisor", divisor), ("centre", centre)):
        if t.dtype != torch.float32 or t.numel() != nb or t.device != xb.device:
            raise CodecError(
                f"quantize_pack: {name} must be {nb} float32 values on {xb.device}, "
                f"got {t.dtype} {list(t.shape)} on {t.device}"
            )


def quantize_pack(
    xb: torch.Tensor,
    bits: torch.Tensor,
    layout: BlockLayout,
    divisor: torch.Tensor,
    centre: torch.Tensor,
    *,
    symmetric: bool,
    seed: int | None = None,
) -> torch.Tensor:
    """The payload (uint8, on ``xb``'s device) of the block view ``xb`` ([num_blocks,
    block_len], as ``layout.to_blocks`` makes it) coded with the per-block ``divisor`` (the
    scale, 1 where it is 0) and ``centre`` ((2**b - 1) / 2 for symmetric blocks, the offset for
    asymmetric ones), both float32, and the uint8 bit map ``bits``: round to nearest, or
    stochastic rounding with the counter-based noise of ``seed``. Same bytes as
    :func:`quantize_pack_ref`."""
    _check(xb, bits, layout, divisor, centre)
    out = torch.empty(expected_payload_nbytes(layout, bits), dtype=torch.uint8, device=xb.device)
    if layout.numel == 0:
        return out
    xb = xb.contiguous()
    bl_m, bl_s = magic(layout.block_len)
    seed_lo, seed_hi = seed_args(seed) if seed is not None else (0, 0)
    for run in payload_runs(layout, bits):
        e = codes_per_byte(run.bits)
        nbytes = TILE // e
        table = divisor if run.all_blocks else run.blocks.to(device=xb.device, dtype=torch.int32)
        grid = (triton.cdiv(run.nbytes, nbytes),)
        _quantize_pack_kernel[grid](
            xb,
            out,
            table,
            divisor,
            centre,
            run.numel,
            run.nbytes,
            run.byte_start,
            layout.block_len,
            bl_m,
            bl_s,
            seed_lo,
            seed_hi,
            BITS=run.bits,
            E=e,
            SYMMETRIC=symmetric,
            STOCHASTIC=seed is not None,
            ALL_BLOCKS=run.all_blocks,
            BYTES=nbytes,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return out


def quantize_pack_ref(
    xb: torch.Tensor,
    bits: torch.Tensor,
    layout: BlockLayout,
    divisor: torch.Tensor,
    centre: torch.Tensor,
    *,
    symmetric: bool,
    seed: int | None = None,
) -> torch.Tensor:
    """The definition: the codec's torch coding (:func:`fedq.codec.reference.encode_blocks`)
    and packing (:func:`~fedq.codec.reference.pack_by_class`) of the same inputs."""
    levels = (2 ** bits.to(device=xb.device, dtype=torch.int32) - 1).float()
    if layout.numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=xb.device)
    codes = encode_blocks(
        xb,
        layout.pieces(PIECE_ELEMS),
        divisor,
        centre,
        levels,
        symmetric=symmetric,
        stochastic=seed is not None,
        generator=None,
        seed=seed,
    )
    return pack_by_class(codes, bits.to("cpu"), layout)
