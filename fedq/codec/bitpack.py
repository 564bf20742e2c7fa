"""Dense bit packing of unsigned codes, 1..8 bits per value (torch reference implementation).

Layout rule (one rule for every width): the packed stream is little-endian and LSB-first. Value ``i``
of a run packed at ``b`` bits occupies stream bits ``[i*b, (i+1)*b)``, where stream bit ``t`` is bit
``t % 8`` of byte ``t // 8``. A run of ``n`` values takes exactly ``ceil(n*b/8)`` bytes: 3-, 5-, 6-
and 7-bit values really pack; only the final byte of a run can hold unused (zero) bits.

``pack_bits`` / ``unpack_bits`` dispatch on the width: widths that divide 8 pack within a byte,
other widths pack 8 values into one ``b``-byte word (int32 for b<=4, int64 otherwise). Names follow
HQQ's explicit ``pack_<n>bit`` convention through :data:`PACKERS`.
"""

from __future__ import annotations

import sys

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


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    rem = (-x.numel()) % multiple
    if rem == 0:
        return x
    return torch.cat([x, x.new_zeros(rem)])


def _pack_in_byte(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    v = _pad_to(codes, per).view(-1, per)
    out = v[:, 0].clone(memory_format=torch.contiguous_format)
    for j in range(1, per):
        out |= v[:, j] << (j * bits)
    return out


def _unpack_in_byte(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    mask = (1 << bits) - 1
    out = torch.empty((data.numel(), per), dtype=torch.uint8, device=data.device)
    for j in range(per):
        torch.bitwise_and(data >> (j * bits), mask, out=out[:, j])
    return out.view(-1)[:n]


def _word_dtype(bits: int) -> torch.dtype:
    return torch.int32 if bits <= 4 else torch.int64


def _pack_in_word(codes: torch.Tensor, bits: int) -> torch.Tensor:
    # 8 values -> one word of 8*bits bits -> its low `bits` bytes (little-endian).
    wdt = _word_dtype(bits)
    v = _pad_to(codes, 8).view(-1, 8).to(wdt)
    word = v[:, 0].clone(memory_format=torch.contiguous_format)
    for j in range(1, 8):
        word |= v[:, j] << (j * bits)
    width = 4 if wdt is torch.int32 else 8
    return word.view(torch.uint8).view(-1, width)[:, :bits].reshape(-1)


def _unpack_in_word(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    wdt = _word_dtype(bits)
    width = 4 if wdt is torch.int32 else 8
    rows = data.numel() // bits
    buf = torch.zeros((rows, width), dtype=torch.uint8, device=data.device)
    buf[:, :bits] = data.view(rows, bits)
    word = buf.view(wdt).view(-1)
    mask = (1 << bits) - 1
    out = torch.empty((rows, 8), dtype=torch.uint8, device=data.device)
    for j in range(8):
        out[:, j] = (word >> (j * bits)) & mask
    return out.view(-1)[:n]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack 1-D uint8 ``codes`` (each < 2**bits) into ``ceil(n*bits/8)`` uint8 bytes."""
    _check(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise CodecError(
            f"pack_bits expects 1-D uint8 codes, got {codes.dtype} {list(codes.shape)}"
        )
    n = codes.numel()
    if n == 0:
        return codes.new_empty(0)
    if bits == 8:
        return codes.clone()
    packed = _pack_in_byte(codes, bits) if 8 % bits == 0 else _pack_in_word(codes, bits)
    return packed[: packed_nbytes(n, bits)]


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` uint8 codes from ``ceil(n*bits/8)`` bytes."""
    _check(bits)
    need = packed_nbytes(n, bits)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != need:
        raise CodecError(
            f"unpack_bits: expected {need} uint8 bytes for {n} values at {bits} bits, "
            f"got {data.dtype} {list(data.shape)}"
        )
    if n == 0:
        return data.new_empty(0)
    if bits == 8:
        return data.clone()
    if 8 % bits == 0:
        return _unpack_in_byte(data, bits, n)
    return _unpack_in_word(_pad_to(data, bits), bits, n)


def _make_packer(b: int):  # type: ignore[no-untyped-def]
    def pack(codes: torch.Tensor) -> torch.Tensor:
        return pack_bits(codes, b)

    def unpack(data: torch.Tensor, n: int) -> torch.Tensor:
        return unpack_bits(data, b, n)

    pack.__name__, unpack.__name__ = f"pack_{b}bit", f"unpack_{b}bit"
    return pack, unpack


#: ``PACKERS[b] == (pack_<b>bit, unpack_<b>bit)`` for b in 1..8.
PACKERS = {b: _make_packer(b) for b in range(1, 9)}
