"""Bit packing: exact round trips, the documented LSB-first stream layout, sizes and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.codec.bitpack import PACKERS, pack_bits, packed_nbytes, unpack_bits
from fedq.errors import CodecError

AWKWARD_N = [0, 1, 2, 7, 8, 9, 13, 15, 16, 17, 63, 64, 65, 1001, 4099]


def _codes(n: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)


def _pack_reference(codes: list[int], bits: int) -> bytes:
    """The layout rule bit by bit: value i owns stream bits [i*b, (i+1)*b), LSB first."""
    out = bytearray(packed_nbytes(len(codes), bits))
    for i, v in enumerate(codes):
        for k in range(bits):
            t = i * bits + k
            out[t // 8] |= ((v >> k) & 1) << (t % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", AWKWARD_N)
def test_round_trip_exact_and_payload_size(bits: int, n: int) -> None:
    q = _codes(n, bits, seed=n * 10 + bits)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == (n * bits + 7) // 8 == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), q)


@pytest.mark.parametrize("bits", range(1, 9))
def test_stream_layout_matches_the_documented_rule(bits: int) -> None:
    # 37 values: several full 8-value words plus a tail that leaves unused bits in the last byte.
    q = _codes(37, bits, seed=bits)
    assert pack_bits(q, bits).numpy().tobytes() == _pack_reference(q.tolist(), bits)


@pytest.mark.parametrize("bits", [1, 3, 4, 7])
def test_long_runs_cross_internal_chunks(bits: int) -> None:
    # Larger than any internal working block, with a ragged tail.
    n = (1 << 20) + 13
    q = _codes(n, bits, seed=bits)
    packed = pack_bits(q, bits)
    assert packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), q)
    # Spot-check the stream rule at the very end of the run (crossing the last chunk boundary).
    start = (n // 8 - 4) * 8  # a word boundary: the stream is byte aligned there
    ref = _pack_reference(q[start:].tolist(), bits)
    assert packed[start * bits // 8 :].numpy().tobytes() == ref


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip_property(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300))
    q = torch.tensor(values, dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.numpy().tobytes() == _pack_reference(values, bits)
    assert unpack_bits(packed, bits, len(values)).tolist() == values


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_non_contiguous_and_offset_inputs_pack_like_copies(bits: int) -> None:
    base = _codes(203, bits, seed=bits)
    for view in (base[::2], base[3:], base[5:-7], base.view(7, 29).t().reshape(-1)[:150]):
        assert torch.equal(pack_bits(view, bits), pack_bits(view.contiguous(), bits))
    packed = pack_bits(base, bits)
    padded = torch.cat([torch.zeros(3, dtype=torch.uint8), packed])
    assert torch.equal(unpack_bits(padded[3:], bits, 203), base)  # storage offset not 8-aligned


def test_unpack_returns_fresh_memory() -> None:
    q = _codes(16, 8)
    packed = pack_bits(q, 8)
    packed[0] ^= 1
    assert not torch.equal(packed, q)  # pack never aliases its input
    out = unpack_bits(packed, 8, 16)
    out[1] ^= 1
    assert out[1] != packed[1]


def test_packers_follow_hqq_naming() -> None:
    assert sorted(PACKERS) == list(range(1, 9))
    q = _codes(21, 3)
    for b, (pack, unpack) in PACKERS.items():
        assert pack.__name__ == f"pack_{b}bit"
        assert unpack.__name__ == f"unpack_{b}bit"
        codes = q & ((1 << b) - 1)
        assert torch.equal(unpack(pack(codes), 21), codes)


@pytest.mark.parametrize("bits", [0, 9, -1, 16])
def test_bad_width_is_a_codec_error(bits: int) -> None:
    with pytest.raises(CodecError):
        pack_bits(_codes(8, 1), bits)
    with pytest.raises(CodecError):
        unpack_bits(torch.zeros(8, dtype=torch.uint8), bits, 8)


def test_bad_inputs_are_codec_errors() -> None:
    with pytest.raises(CodecError):
        pack_bits(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(CodecError):
        pack_bits(torch.zeros(2, 4, dtype=torch.uint8), 4)
    with pytest.raises(CodecError):  # one byte short
        unpack_bits(torch.zeros(packed_nbytes(10, 3) - 1, dtype=torch.uint8), 3, 10)
    with pytest.raises(CodecError):
        unpack_bits(torch.zeros(0, dtype=torch.uint8), 3, -1)
    with pytest.raises(CodecError):  # one byte too many
        unpack_bits(torch.zeros(packed_nbytes(10, 3) + 1, dtype=torch.uint8), 3, 10)
