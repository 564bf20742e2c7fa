"""Budgeted allocation: bytes match the codec, budgets hold, bits go where they cut most error."""

from __future__ import annotations

import logging

import pytest
import torch

from fedq.adapt import BitContext, BudgetBits, estimated_bytes, estimated_error
from fedq.adapt.budget import error_weight
from fedq.codec import Granularity, QuantSpec, quantize
from fedq.errors import CodecError, ConfigError

CTX = BitContext(0, 10)
SPECS = [
    QuantSpec(),  # per-channel, asymmetric, fp16 scales
    QuantSpec(symmetric=True, scale_dtype="float32"),
    QuantSpec(granularity=Granularity.GROUP, group_size=16),
    QuantSpec(granularity=Granularity.TENSOR),
]


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g) * 0.5,
        "conv.bias": torch.randn(8, generator=g) * 0.01,
        "fc.weight": torch.randn(10, 72, generator=g) * 2.0,
        "fc.bias": torch.randn(10, generator=g),
        "odd": torch.randn(37, generator=g) * 5.0,
    }


@pytest.mark.parametrize("spec", SPECS)
def test_estimated_bytes_equals_codec_bytes(spec: QuantSpec) -> None:
    """The budget is only meaningful if it counts what the codec really emits."""
    tensors = _model()
    bits = {"conv.weight": 3, "conv.bias": 8, "fc.weight": 5, "fc.bias": 1, "odd": 7}
    packed = [quantize(x, bits[n], spec) for n, x in tensors.items()]
    codec_bytes = sum(p.payload_nbytes + p.metadata_nbytes for p in packed)
    assert estimated_bytes(tensors, bits, spec) == codec_bytes


def test_estimated_bytes_above_8_bits_is_raw_fp16_or_fp32() -> None:
    tensors = {"a": torch.zeros(10, 4)}
    assert estimated_bytes(tensors, {"a": 9}, QuantSpec()) == 80
    assert estimated_bytes(tensors, {"a": 16}, QuantSpec()) == 80
    assert estimated_bytes(tensors, {"a": 17}, QuantSpec()) == 160
    assert estimated_bytes(tensors, {"a": 32}, QuantSpec()) == 160


def test_error_weight_matches_hand_computation() -> None:
    row = torch.tensor([[0.0, 1.0, 3.0], [-2.0, 2.0, 0.0]])
    x = row.repeat(1, 6)  # channels of 18 elements: long enough to stay per-channel
    # per-channel asymmetric: ranges 3 and 4, 18 elements each -> (18*9 + 18*16) / 12
    assert error_weight(x, QuantSpec()) == pytest.approx((18 * 9 + 18 * 16) / 12)
    # symmetric: ranges 2*3 and 2*2
    assert error_weight(x, QuantSpec(symmetric=True)) == pytest.approx((18 * 36 + 18 * 16) / 12)
    # err(b) = S / (2^b - 1)^2
    assert estimated_error({"x": x}, {"x": 2}, QuantSpec()) == pytest.approx(450 / 12 / 9)
    # channels of 3 elements are too short for per-channel metadata: one group of 6, range 5
    assert error_weight(row, QuantSpec()) == pytest.approx(6 * 25 / 12)


def test_error_weight_partial_group_uses_valid_lengths() -> None:
    x = torch.arange(5, dtype=torch.float32)  # groups of 4: [0..3] range 3, [4] range 0
    spec = QuantSpec(granularity=Granularity.GROUP, group_size=4)
    assert error_weight(x, spec) == pytest.approx(4 * 9 / 12)


def test_estimated_error_tracks_real_quantization_error() -> None:
    """Sanity of the model: the estimate is within 2x of the measured error at 4 bits."""
    from fedq.codec import dequantize

    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    measured = float((dequantize(quantize(x, 4)) - x).square().sum())
    est = estimated_error({"x": x}, {"x": 4}, QuantSpec())
    assert 0.5 < est / measured < 2.0


@pytest.mark.parametrize("spec", SPECS)
def test_budget_respected_and_error_monotone_in_budget(spec: QuantSpec) -> None:
    tensors = _model()
    floor = estimated_bytes(tensors, dict.fromkeys(tensors, 1), spec)
    ceiling = estimated_bytes(tensors, dict.fromkeys(tensors, 8), spec)
    prev_err = float("inf")
    for budget in range(floor, ceiling + 20, 7):
        policy = BudgetBits(budget, spec=spec)
        bits = policy.choose(tensors, CTX)
        assert set(bits) == set(tensors)
        assert all(1 <= b <= 8 for b in bits.values())
        assert estimated_bytes(tensors, bits, spec) <= budget
        assert policy.last_overflow == 0
        err = estimated_error(tensors, bits, spec)
        assert err <= prev_err * (1 + 1e-12), f"budget {budget} gave a larger error"
        prev_err = err
    assert BudgetBits(ceiling, spec=spec).choose(tensors, CTX) == dict.fromkeys(tensors, 8)
    assert BudgetBits(floor, spec=spec).choose(tensors, CTX) == dict.fromkeys(tensors, 1)


def test_budget_uses_most_of_the_budget() -> None:
    """Greedy with freezing keeps spending on small tensors when a big one no longer fits."""
    tensors = _model()
    spec = QuantSpec()
    for budget in (600, 900, 1200):
        bits = BudgetBits(budget, spec=spec).choose(tensors, CTX)
        used = estimated_bytes(tensors, bits, spec)
        # no single remaining step that would fit is left untaken
        for name, b in bits.items():
            if b < 8:
                bumped = {**bits, name: b + 1}
                assert estimated_bytes(tensors, bumped, spec) > budget, (budget, name, used)


def test_more_bits_for_larger_range_at_equal_size() -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {"small": torch.randn(16, 64, generator=g), "large": torch.randn(16, 64, generator=g)}
    tensors["large"] = tensors["large"] * 50.0
    spec = QuantSpec()
    mid = estimated_bytes(tensors, {"small": 4, "large": 4}, spec)
    bits = BudgetBits(mid, spec=spec).choose(tensors, CTX)
    assert bits["large"] > bits["small"]
    assert estimated_bytes(tensors, bits, spec) <= mid


def test_deterministic_and_order_independent() -> None:
    tensors = _model()
    policy = BudgetBits(1000)
    first = policy.choose(tensors, CTX)
    reversed_order = dict(reversed(list(tensors.items())))
    assert policy.choose(tensors, CTX) == first
    assert BudgetBits(1000).choose(reversed_order, CTX) == first
    assert list(policy.choose(reversed_order, CTX)) == list(reversed_order)  # keeps caller's order


def test_ties_break_by_name() -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    tensors = {"b": x.clone(), "a": x.clone()}
    spec = QuantSpec()
    one_step = estimated_bytes(tensors, {"a": 2, "b": 1}, spec)
    assert BudgetBits(one_step, spec=spec).choose(tensors, CTX) == {"b": 1, "a": 2}


def test_overflow_uses_b_min_and_reports(caplog: pytest.LogCaptureFixture) -> None:
    tensors = _model()
    spec = QuantSpec()
    need = estimated_bytes(tensors, dict.fromkeys(tensors, 2), spec)
    policy = BudgetBits(need - 10, b_min=2, spec=spec)
    with caplog.at_level(logging.WARNING, logger="fedq.adapt.budget"):
        bits = policy.choose(tensors, CTX)
    assert bits == dict.fromkeys(tensors, 2)
    assert policy.last_overflow == 10
    assert "below" in caplog.text
    assert policy.state_dict() == {"last_overflow": 10}
    # a later round within budget clears it
    policy.bytes_per_round = need
    policy.choose(tensors, CTX)
    assert policy.last_overflow == 0
    restored = BudgetBits(need)
    restored.load_state_dict({"last_overflow": 10})
    assert restored.last_overflow == 10


def test_b_max_caps_allocation() -> None:
    tensors = _model()
    bits = BudgetBits(10**9, b_min=2, b_max=5).choose(tensors, CTX)
    assert bits == dict.fromkeys(tensors, 5)


def test_constant_and_empty_tensors_stay_at_b_min() -> None:
    tensors = {"const": torch.full((8, 8), 3.0), "empty": torch.zeros(0, 4), "x": torch.randn(8, 8)}
    bits = BudgetBits(10**6).choose(tensors, CTX)
    assert bits == {"const": 1, "empty": 1, "x": 8}


def test_non_finite_tensor_is_an_error() -> None:
    with pytest.raises(CodecError, match="NaN or Inf"):
        BudgetBits(1000).choose({"x": torch.tensor([[1.0, float("nan")]])}, CTX)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"bytes_per_round": 0}, "bytes_per_round must be > 0"),
        ({"bytes_per_round": 1.5}, "integer"),
        ({"bytes_per_round": 100, "b_max": 9}, "b_max must be in 1..8"),
        ({"bytes_per_round": 100, "b_min": 4, "b_max": 3}, "b_min"),
        ({"bytes_per_round": 100, "spec": {"symmetric": True}}, "QuantSpec"),
    ],
)
def test_budget_parameter_validation(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        BudgetBits(**kwargs)  # type: ignore[arg-type]
