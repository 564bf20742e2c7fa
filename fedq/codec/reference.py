"""The codec's torch routines that the Triton kernels (``fedq_kernels``) reproduce and test
against: coding a block view into uint8 codes, packing them into the payload's runs (one per
bit-width class) and back, and the whole torch decode of a :class:`PackedTensor`.

:mod:`fedq.codec.quantize` builds on these (it adds the per-block ranges, scales and the choice
of path) and the kernels import them as their definition, so both import this module and it
imports neither: it never dispatches to the kernels. The arithmetic is specified in
docs/wire-format.md.
"""

from __future__ import annotations

import dataclasses

import torch

from fedq.codec.bitpack import pack_bits, unpack_bits, unpack_bits_into
from fedq.codec.layout import BlockLayout, Piece
from fedq.codec.noise import counter_uniform
from fedq.codec.packed import FLOAT_DTYPES, Encoding, PackedTensor

#: Elements per working piece of the [num_blocks, block_len] view: one float32 piece (1 MiB) stays
#: in L2 while it goes through the few elementwise steps of coding, and no step allocates a
#: tensor the size of the input (fresh 64 MiB buffers cost more in page faults than the maths).
PIECE_ELEMS = 1 << 18


def encode_blocks(
    xb: torch.Tensor,
    pieces: list[Piece],
    s: torch.Tensor,
    centre: torch.Tensor,
    levels: torch.Tensor,
    *,
    symmetric: bool,
    stochastic: bool,
    generator: torch.Generator | None,
    seed: int | None = None,
) -> torch.Tensor:
    """uint8 codes [num_blocks, block_len]: ``clamp(round(v), 0, levels)`` with
    ``v = x / s + centre`` (symmetric) or ``v = (x - centre) / s`` (asymmetric), computed piece by
    piece in a reused float32 buffer. Stochastic rounding ``floor(v + u)`` draws its noise in
    element order, so the generator is consumed exactly as by one ``torch.rand`` over the view;
    with a ``seed``, ``u`` is the counter-based noise of each element's block-view index."""
    s, centre = s.unsqueeze(1), centre.unsqueeze(1)
    uniform = bool((levels == levels[0]).all())
    top = float(levels[0]) if uniform else levels.unsqueeze(1)
    codes = torch.empty(xb.shape, dtype=torch.uint8, device=xb.device)
    buf = torch.empty(PIECE_ELEMS, dtype=torch.float32, device=xb.device)
    noise = torch.empty_like(buf) if stochastic and seed is None else buf
    for rows, cols, _ in pieces:
        piece = xb[rows, cols]
        v = buf[: piece.numel()].view(piece.shape)
        if symmetric:
            torch.div(piece, s[rows], out=v)
            v += centre[rows]
        else:
            torch.sub(piece, centre[rows], out=v)
            v /= s[rows]
        if stochastic and seed is not None:
            r0, c0 = rows.start or 0, cols.start or 0
            r = torch.arange(r0, r0 + piece.shape[0], device=xb.device).unsqueeze(1)
            c = torch.arange(c0, c0 + piece.shape[1], device=xb.device)
            v += counter_uniform(seed, r * xb.shape[1] + c)
            v.floor_()
        elif stochastic:
            u = noise[: piece.numel()].view(piece.shape)
            v += u.uniform_(generator=generator)
            v.floor_()
        else:
            v.round_()
        if isinstance(top, float):
            v.clamp_(0.0, top)
        else:
            torch.minimum(v.clamp_(min=0.0), top[rows], out=v)
        codes[rows, cols] = v
    return codes


def pack_by_class(codes: torch.Tensor, bm: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Pack [num_blocks, block_len] codes: one run per bit-width class, blocks in order."""
    pad = layout.padding
    present = torch.unique(bm).tolist()
    if len(present) == 1:
        flat = codes.reshape(-1)
        return pack_bits(flat[: flat.numel() - pad] if pad else flat, int(present[0]))
    parts = []
    last = layout.num_blocks - 1
    for b in present:
        rows = (bm == b).nonzero().squeeze(1).to(codes.device)
        flat = codes.index_select(0, rows).reshape(-1)
        if pad and int(rows[-1]) == last:
            flat = flat[: flat.numel() - pad]
        parts.append(pack_bits(flat, int(b)))
    return torch.cat(parts)


def unpack_by_class(p: PackedTensor, layout: BlockLayout) -> torch.Tensor:
    """Inverse of :func:`pack_by_class`: uint8 codes [num_blocks, block_len] (padding zero)."""
    dev = p.payload.device
    codes = torch.empty((layout.num_blocks, layout.block_len), dtype=torch.uint8, device=dev)
    present = torch.unique(p.bits).tolist()
    if len(present) == 1:  # one run in element order: decode straight into the block buffer
        flat = codes.view(-1)
        unpack_bits_into(p.payload, int(present[0]), flat[: layout.numel])
        flat[layout.numel :] = 0
        return codes
    lens = layout.block_lengths()
    pos = 0
    last = layout.num_blocks - 1
    for b in present:
        rows = (p.bits == b).nonzero().squeeze(1)
        n = int(lens[rows].sum())
        nbytes = (n * int(b) + 7) // 8
        flat = unpack_bits(p.payload[pos : pos + nbytes], int(b), n)
        pos += nbytes
        if layout.padding and int(rows[-1]) == last:
            flat = torch.cat([flat, flat.new_zeros(layout.padding)])
        codes.index_copy_(0, rows.to(dev), flat.view(-1, layout.block_len))
    return codes


def dequantize(
    p: PackedTensor,
    *,
    device: torch.device | str | None = None,
    piece_elems: int = PIECE_ELEMS,
) -> torch.Tensor:
    """Decode a :class:`PackedTensor` to a tensor of its original shape and dtype, in torch on
    any device (:func:`fedq.codec.quantize.dequantize` is this or the kernels). The float32 maths
    goes in pieces of at most ``piece_elems`` elements (results do not depend on it)."""
    out_dtype = FLOAT_DTYPES[p.dtype]
    dev = torch.device(device) if device is not None else p.payload.device
    if p.encoding is Encoding.RAW:
        return p.payload.to(dev).view(out_dtype).reshape(p.shape).clone()
    layout = p.layout
    if layout.numel == 0:
        return torch.empty(p.shape, dtype=out_dtype, device=dev)
    if p.payload.device != dev:  # unpack where the tensor is wanted (the packed form is smaller)
        p = dataclasses.replace(p, payload=p.payload.to(dev))
    codes = unpack_by_class(p, layout)
    s = p.scales.to(device=dev, dtype=torch.float32).unsqueeze(1)
    if p.symmetric:
        centre = ((2 ** p.bits.to(device=dev, dtype=torch.int32) - 1).float() / 2).unsqueeze(1)
    else:
        assert p.offsets is not None
        centre = p.offsets.to(device=dev, dtype=torch.float32).unsqueeze(1)
    out = torch.empty(codes.shape, dtype=out_dtype, device=dev)
    buf = None if out_dtype == torch.float32 else torch.empty(piece_elems, device=dev)
    for rows, cols, _ in layout.pieces(piece_elems):  # float32 maths piece by piece
        q = codes[rows, cols]
        v = out[rows, cols] if buf is None else buf[: q.numel()].view(q.shape)
        if p.symmetric:  # x_hat = (q - centre) * s
            torch.sub(q, centre[rows], out=v)
            v *= s[rows]
        else:  # x_hat = q * s + offset
            torch.mul(q, s[rows], out=v)
            v += centre[rows]
        if buf is not None:
            out[rows, cols] = v
    return restore_rows(layout.from_blocks(out), p)


def restore_rows(y: torch.Tensor, p: PackedTensor) -> torch.Tensor:
    """The row-wise last steps of decoding ``y`` (the blocks' values, ``p``'s shape and dtype):
    multiply by the row scales, then put the outlier rows in. Returns ``y`` itself (changed in
    place) or a new tensor."""
    if p.row_scales is not None:
        r = p.row_scales.to(device=y.device, dtype=torch.float32).unsqueeze(1)
        y = (y.reshape(-1, p.shape[-1]).float() * r).to(y.dtype).reshape(p.shape)
    if p.outlier_index is not None and p.outlier_values is not None:
        rows = y.reshape(-1, p.shape[-1])
        idx = p.outlier_index.to(device=y.device, dtype=torch.int64)
        rows[idx] = p.outlier_values.to(device=y.device, dtype=y.dtype)
        y = rows.reshape(p.shape)
    return y
