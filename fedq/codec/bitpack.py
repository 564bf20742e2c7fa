"""Dense bit packing of unsigned codes, 1..8 bits per value (torch reference implementation).

Layout rule (one rule for every width): the packed stream is little-endian and LSB-first. Value
``i`` of a run packed at ``b`` bits occupies stream bits ``[i*b, (i+1)*b)``, where stream bit ``t``
is bit ``t % 8`` of byte ``t // 8``. A run of ``n`` values takes exactly ``ceil(n*b/8)`` bytes:
3-, 5-, 6- and 7-bit values really pack; only the final byte of a run can hold unused (zero) bits.

Every width packs the same way: 8 byte-sized codes, viewed as one int64, are merged into the low
``b`` bytes of that word by three shift-and-mask steps on whole tensors (no per-value loops, no
strided per-column passes), processed in cache-sized chunks. Names follow HQQ's explicit
``pack_<n>bit`` convention through :data:`PACKERS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from fedq.errors import CodecError

if sys.byteorder != "little":  # pragma: no cover - all supported targets are little-endian
    raise ImportError("fedq bit packing assumes a little-endian host")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` values at ``bits`` bits occupy: ``ceil(n*bits/8)``."""
    return (n * bits + 7) // 8


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise CodecError(f"bit-width must be in 1..8, got {bits}")


#: Words (8 values each) handled per step: three int64 buffers of this length stay in L2 cache,
#: and the step is still long enough for torch to split it across threads.
_CHUNK_WORDS = 1 << 16


def _lane_mask(width: int, lane: int) -> int:
    """``width`` low bits set in every ``lane``-bit lane of a 64-bit word."""
    return sum(((1 << width) - 1) << k for k in range(0, 64, lane))


def _stages(bits: int) -> list[tuple[int, int, int]]:
    """The three merge steps of 8 byte-sized values into one ``8*bits``-bit field, as
    ``(half_lane, value_width, lo_mask)``: each ``2*half_lane``-bit lane holds two
    ``value_width``-bit fields, at bit 0 and at bit ``half_lane``, which merge into one field of
    twice the width (SWAR, as in "Hacker's Delight" 7-1: compress by doubling)."""
    return [(h, w, _lane_mask(w, 2 * h)) for h, w in ((8, bits), (16, 2 * bits), (32, 4 * bits))]


def _pack_words(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack ``8*m`` codes (contiguous, 8-byte aligned) into ``out`` [m, bits] uint8."""
    src = codes.view(torch.int64)
    m = src.numel()
    stages = _stages(bits)
    acc = torch.empty(min(m, _CHUNK_WORDS), dtype=torch.int64, device=codes.device)
    tmp = torch.empty_like(acc)
    for s in range(0, m, _CHUNK_WORDS):
        e = min(s + _CHUNK_WORDS, m)
        a, t, x = acc[: e - s], tmp[: e - s], src[s:e]
        for h, w, lo in stages:  # field at bit h moves down to bit w, next to the field at bit 0
            torch.bitwise_right_shift(x, h - w, out=t)
            t &= lo << w
            torch.bitwise_and(x, lo, out=a)
            a |= t
            x = a
        out[s:e].copy_(a.view(torch.uint8).view(-1, 8)[:, :bits])


def _unpack_words(data: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Inverse of :func:`_pack_words`: ``data`` [m, bits] uint8 into ``8*m`` codes ``out``."""
    dst = out.view(torch.int64)
    m = dst.numel()
    stages = _stages(bits)[::-1]
    acc = torch.empty(min(m, _CHUNK_WORDS), dtype=torch.int64, device=data.device)
    tmp = torch.empty_like(acc)
    for s in range(0, m, _CHUNK_WORDS):
        e = min(s + _CHUNK_WORDS, m)
        a, t = acc[: e - s], tmp[: e - s]
        # Bytes bits..7 of each word keep stale values; every stage masks them away.
        a.view(torch.uint8).view(-1, 8)[:, :bits].copy_(data[s:e])
        for i, (h, w, lo) in enumerate(stages):  # the field at bit w moves up to bit h
            torch.bitwise_left_shift(a, h - w, out=t)
            t &= lo << h
            a &= lo
            torch.bitwise_or(a, t, out=dst[s:e] if i == len(stages) - 1 else a)


def _word_aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous with an 8-byte aligned start, so that it can be viewed as int64."""
    if x.is_contiguous() and x.storage_offset() % 8 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack 1-D uint8 ``codes`` (each < 2**bits) into ``ceil(n*bits/8)`` uint8 bytes."""
    _check(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise CodecError(
            f"pack_bits expects 1-D uint8 codes, got {codes.dtype} {list(codes.shape)}"
        )
    n = codes.numel()
    if bits == 8:
        return codes.clone(memory_format=torch.contiguous_format)
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=codes.device)
    full = n // 8
    if full:
        body = _word_aligned(codes[: 8 * full])
        _pack_words(body, bits, out[: full * bits].view(full, bits))
    if n > 8 * full:  # ragged tail: pad the last word with zero codes
        last = codes.new_zeros(8)
        last[: n - 8 * full] = codes[8 * full :]
        word = torch.empty((1, bits), dtype=torch.uint8, device=codes.device)
        _pack_words(last, bits, word)
        out[full * bits :] = word.view(-1)[: out.numel() - full * bits]
    return out


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` uint8 codes from ``ceil(n*bits/8)`` bytes."""
    if n < 0:
        raise CodecError(f"unpack_bits: negative value count {n}")
    out = torch.empty(n, dtype=torch.uint8, device=data.device)
    unpack_bits_into(data, bits, out)
    return out


def unpack_bits_into(data: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """:func:`unpack_bits` into a caller's 1-D uint8 tensor (saves a copy when decoding straight
    into a block buffer)."""
    _check(bits)
    n = out.numel()
    need = packed_nbytes(n, bits)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != need:
        raise CodecError(
            f"unpack_bits: expected {need} uint8 bytes for {n} values at {bits} bits, "
            f"got {data.dtype} {list(data.shape)}"
        )
    if out.dtype != torch.uint8 or out.dim() != 1:
        raise CodecError(f"unpack_bits: out must be 1-D uint8, got {out.dtype} {list(out.shape)}")
    if bits == 8:
        out.copy_(data)
        return
    full = n // 8
    if full:
        body = out[: 8 * full]
        dst = _word_aligned(body)
        _unpack_words(data[: full * bits].reshape(full, bits), bits, dst)
        if dst is not body:
            body.copy_(dst)
    if n > 8 * full:  # ragged tail: the last bytes, zero padded to a whole word
        word = data.new_zeros((1, bits))
        word.view(-1)[: need - full * bits] = data[full * bits :]
        last = torch.empty(8, dtype=torch.uint8, device=data.device)
        _unpack_words(word, bits, last)
        out[8 * full :] = last[: n - 8 * full]


Packer = Callable[[torch.Tensor], torch.Tensor]
Unpacker = Callable[[torch.Tensor, int], torch.Tensor]


def _make_packer(b: int) -> tuple[Packer, Unpacker]:
    def pack(codes: torch.Tensor) -> torch.Tensor:
        return pack_bits(codes, b)

    def unpack(data: torch.Tensor, n: int) -> torch.Tensor:
        return unpack_bits(data, b, n)

    pack.__name__, unpack.__name__ = f"pack_{b}bit", f"unpack_{b}bit"
    return pack, unpack


#: ``PACKERS[b] == (pack_<b>bit, unpack_<b>bit)`` for b in 1..8.
PACKERS: dict[int, tuple[Packer, Unpacker]] = {b: _make_packer(b) for b in range(1, 9)}
