"""wire-format §11.2 and §11.3 (informative): an encoder written from the document alone, with
numpy, reproduces fedq's bytes for asymmetric blocks with the ``minmax``, ``sigma`` and ``mse``
ranges, scored exactly (short blocks) and on a strided sample (long blocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedq.codec import QuantSpec, quantize

F32 = np.float32
#: §11.3: half-widths in standard deviations, per bit width (binary32 constants).
K = {1: 0.798, 2: 1.494, 3: 2.051, 4: 2.514, 5: 2.916, 6: 3.278, 7: 3.611, 8: 3.922}
FACTORS = (1.0, 1.25, 1.5, 2.0, 3.0)


def _round_down(v: np.float32) -> np.float16:
    y = np.float16(v)  # RNE
    return np.nextafter(y, np.float16(-np.inf)) if F32(y) > v else y


def _round_up(v: np.float32) -> np.float16:
    y = np.float16(v)
    return np.nextafter(y, np.float16(np.inf)) if F32(y) < v else y


def _meta(lo: np.float32, hi: np.float32, levels: np.float32) -> tuple[np.float16, np.float16]:
    off = _round_down(lo)
    return off, _round_up(F32(F32(hi - F32(off)) / levels))


def _codes(x: np.ndarray, off: np.float16, scale: np.float16, levels: np.float32) -> np.ndarray:
    s = F32(scale) if F32(scale) > 0 else F32(1.0)
    v = ((x - F32(off)) / s).astype(F32)
    return np.clip(np.rint(v), 0, levels)  # rint: round half to even


def _range(x: np.ndarray, bits: int, how: str) -> tuple[np.float32, np.float32]:
    lo, hi = x.min(), x.max()
    if how == "minmax":
        return lo, hi
    n = F32(x.size)
    mean = F32(x.sum(dtype=F32) / n)
    std = np.sqrt(max(F32(F32((x * x).sum(dtype=F32) / n) - F32(mean * mean)), F32(0.0)))
    half = F32(F32(K[bits]) * std)

    def clip(f: float) -> tuple[np.float32, np.float32]:
        h = F32(F32(f) * half)
        return max(lo, F32(mean - h)), min(hi, F32(mean + h))

    if how == "sigma":
        return clip(1.0)
    levels = F32(2**bits - 1)
    step = -(-x.size // 256)
    xs = x[::step]
    n1_lo, n1_hi = clip(1.0)
    tails = x[(x < n1_lo) | (x > n1_hi)]
    best, best_err = (lo, hi), np.inf
    for c_lo, c_hi in [*(clip(f) for f in FACTORS), (lo, hi)]:
        off, scale = _meta(c_lo, c_hi, levels)
        s = F32(scale) if F32(scale) > 0 else F32(1.0)
        recon = (_codes(xs, off, scale, levels) * s + F32(off)).astype(F32)
        if step == 1:
            err = float(((recon - x) ** 2).sum(dtype=F32))
        else:
            rounding = ((recon - np.clip(xs, c_lo, c_hi)) ** 2).sum(dtype=F32)
            err = float(rounding * F32(n / F32(xs.size)))
            err += float(((tails - np.clip(tails, c_lo, c_hi)) ** 2).sum(dtype=F32))
        if err < best_err:  # a tie keeps the earlier candidate
            best, best_err = (c_lo, c_hi), err
    return best


def _pack(codes: np.ndarray, bits: int) -> bytes:
    stream = ((codes.astype(np.uint32)[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(stream.ravel(), bitorder="little").tobytes()


@pytest.mark.parametrize("how", ["minmax", "sigma", "mse"])
@pytest.mark.parametrize("length", [64, 300], ids=["exact", "sampled"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_a_document_encoder_gives_fedqs_bytes(how: str, length: int, bits: int) -> None:
    gen = np.random.default_rng(1000 * bits + length)
    x = gen.standard_t(3, size=(8, length)).astype(F32)  # heavy tails: the ranges differ
    x[3] *= 10
    if how != "minmax":  # the data makes the range matter
        assert any(_range(r, bits, how) != _range(r, bits, "minmax") for r in x)
    offs, scales, codes = [], [], []
    levels = F32(2**bits - 1)
    for row in x:  # CHANNEL, axis 0: each row is a block
        off, scale = _meta(*_range(row, bits, how), levels)
        offs.append(off)
        scales.append(scale)
        codes.append(_codes(row, off, scale, levels))
    p = quantize(torch.from_numpy(x), bits, QuantSpec(range=how))
    assert p.offsets is not None
    assert p.offsets.numpy().tobytes() == np.array(offs, np.float16).tobytes()
    assert p.scales.numpy().tobytes() == np.array(scales, np.float16).tobytes()
    assert p.payload.numpy().tobytes() == _pack(np.concatenate(codes), bits)
