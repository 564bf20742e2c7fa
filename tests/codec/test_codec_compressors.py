"""Compressors: identity parity, the uncompressed path, error feedback and checkpointed state."""

from __future__ import annotations

import pytest
import torch

from fedq.codec import (
    Encoding,
    ErrorFeedback,
    Granularity,
    IdentityCompressor,
    QuantCompressor,
    QuantSpec,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_identity_is_exact(dtype: torch.dtype) -> None:
    c = IdentityCompressor()
    x = torch.randn(7, 9).to(dtype).t()  # non-contiguous on purpose
    p = c.compress("w", x, 2)  # bits are ignored
    assert p.encoding is Encoding.RAW
    assert p.payload_nbytes == x.numel() * x.element_size()
    y = c.decompress(p)
    assert y.dtype == dtype and torch.equal(y, x)
    assert c.state_dict() == {}


@pytest.mark.parametrize("bits", [17, 32])
def test_quant_compressor_sends_17_to_32_bits_exactly(bits: int) -> None:
    c = QuantCompressor()
    x = torch.randn(5, 6)
    p = c.compress("w", x, bits)
    assert p.encoding is Encoding.RAW
    assert torch.equal(c.decompress(p), x)


def test_quant_compressor_quantizes_narrow_widths() -> None:
    c = QuantCompressor(QuantSpec(Granularity.GROUP, group_size=8))
    x = torch.randn(5, 6)
    p = c.compress("w", x, 4)
    assert p.encoding is Encoding.QUANTIZED and p.mean_bits() == 4.0
    assert p.payload_nbytes == 15  # ceil(30 * 4 / 8)
    assert not torch.equal(c.decompress(p), x)


def test_error_feedback_residual_is_corrected_minus_decoded() -> None:
    ef = ErrorFeedback(QuantCompressor())
    x1, x2 = torch.randn(6, 10), torch.randn(6, 10)
    p1 = ef.compress("w", x1, 2)
    r1 = ef.residuals["w"]
    assert torch.allclose(r1, x1 - ef.decompress(p1), atol=0, rtol=0)
    assert float(r1.abs().max()) > 0
    p2 = ef.compress("w", x2, 2)
    assert torch.equal(ef.residuals["w"], (x2 + r1) - ef.decompress(p2))


def test_error_feedback_does_not_accumulate_error() -> None:
    """Sending the same tensor T times at 1 bit: without error feedback the sum of what was decoded
    drifts by T times the (fixed) rounding error; with it the drift equals the last residual,
    which is one rounding error of the last step (at most half its step)."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    steps = 60
    plain, ef = QuantCompressor(), ErrorFeedback(QuantCompressor())
    sent_plain = torch.zeros_like(x)
    sent_ef = torch.zeros_like(x)
    for _ in range(steps):
        sent_plain += plain.decompress(plain.compress("w", x, 1))
        last = ef.compress("w", x, 1)
        sent_ef += ef.decompress(last)
    drift_plain = (sent_plain - steps * x).abs().max()
    drift_ef = (sent_ef - steps * x).abs()
    # Telescoping: sum(x) - sum(decoded) == final residual (up to float rounding).
    assert torch.allclose(steps * x - sent_ef, ef.residuals["w"], atol=1e-3)
    half_step = last.scales.float().unsqueeze(1) / 2  # per-channel: one scale per row
    assert bool((drift_ef <= half_step * 1.001 + 1e-4).all())
    assert float(drift_plain) > 10 * float(drift_ef.max())


def test_error_feedback_keeps_per_name_residuals_and_resets_on_shape_change() -> None:
    ef = ErrorFeedback(QuantCompressor())
    ef.compress("a", torch.randn(4, 4), 2)
    ef.compress("b", torch.randn(3, 5), 2)
    assert set(ef.residuals) == {"a", "b"}
    x = torch.randn(2, 2)
    p = ef.compress("a", x, 2)  # a different shape: the stale residual is not added
    assert torch.equal(ef.residuals["a"], x - ef.decompress(p))


def test_state_dict_round_trip_restores_residuals_and_rng() -> None:
    spec = QuantSpec(stochastic=True)
    ef = ErrorFeedback(QuantCompressor(spec, seed=1))
    for i in range(3):
        ef.compress("w", torch.randn(6, 8, generator=torch.Generator().manual_seed(i)), 3)
    state = ef.state_dict()
    x = torch.randn(6, 8)
    expected = ef.compress("w", x, 3)
    expected_residual = ef.residuals["w"].clone()

    restored = ErrorFeedback(QuantCompressor(spec, seed=99))
    restored.load_state_dict(state)
    assert torch.equal(restored.residuals["w"], state["residuals"]["w"])
    got = restored.compress("w", x, 3)
    assert torch.equal(got.payload, expected.payload)
    assert torch.equal(restored.residuals["w"], expected_residual)

    fresh = ErrorFeedback(QuantCompressor(spec, seed=99))
    assert not torch.equal(fresh.compress("w", x, 3).payload, expected.payload)


def test_state_dict_is_a_snapshot() -> None:
    ef = ErrorFeedback(QuantCompressor(QuantSpec(stochastic=True)))
    ef.compress("w", torch.randn(4, 4), 2)
    state = ef.state_dict()
    before = state["residuals"]["w"].clone()
    ef.compress("w", torch.randn(4, 4), 2)
    assert torch.equal(state["residuals"]["w"], before)


def test_more_than_8_bits_travels_uncompressed_at_no_fewer_bits() -> None:
    from fedq.codec import Encoding, QuantCompressor

    x = torch.randn(64, 32)
    comp = QuantCompressor()
    for bits, dtype, nbytes in ((9, "float16", 2), (16, "float16", 2), (17, "float32", 4)):
        p = comp.compress("w", x, bits)
        assert p.encoding is Encoding.RAW and p.dtype == dtype, bits
        assert p.payload_nbytes == nbytes * x.numel()
        assert p.mean_bits() >= bits
    big = torch.full((4,), 1e6)
    assert comp.compress("w", big, 12).dtype == "float32"  # beyond fp16's range: keep fp32
    torch.testing.assert_close(
        comp.decompress(comp.compress("w", x, 12)).float(), x, rtol=1e-3, atol=1e-3
    )
