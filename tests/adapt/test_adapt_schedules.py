"""Cosine and client-entropy schedules against hand-computed values (docs/algorithms.md
§2.5-2.6)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedq.adapt import (
    BitContext,
    ClientEntropyBits,
    CosineBits,
    FixedBits,
    client_importance,
    cosine_factor,
    label_entropy,
    normalized_label_entropy,
)
from fedq.errors import ConfigError

TENSORS = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


def test_fixed_bits_gives_every_tensor_the_width() -> None:
    assert FixedBits(5).choose(TENSORS, BitContext(3, 10)) == {"w": 5, "b": 5}


def test_cosine_factor_endpoints() -> None:
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5, abs=1e-15)
    assert cosine_factor(10, 10) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0, 32),  # 8 + 24 * 1
        (50, 20),  # 8 + 24 * 0.5
        (100, 8),  # 8 + 24 * 0
        (25, 28),  # 8 + 24 * 0.853553 = 28.485 -> 28
        (75, 12),  # 8 + 24 * 0.146447 = 11.515 -> 12
        (10, 31),  # 8 + 24 * 0.975528 = 31.413 -> 31
    ],
)
def test_cosine_bits_hand_values(t: int, expected: int) -> None:
    policy = CosineBits()  # b_max=32, b_min=8 (paper's MNIST/CIFAR10 values)
    assert policy.choose(TENSORS, BitContext(t, 100)) == {"w": expected, "b": expected}


def test_cosine_bits_medical_min_and_monotone() -> None:
    policy = CosineBits(b_max=32, b_min=12)
    widths = [policy.bits_at(BitContext(t, 40)) for t in range(41)]
    assert widths[0] == 32 and widths[20] == 22 and widths[-1] == 12
    assert all(a >= b for a, b in itertools.pairwise(widths))


def test_cosine_rounding_is_half_to_even() -> None:
    # b_min=1, b_max=4, t=T/2: 1 + 3 * 0.5 = 2.5 -> 2 (Python round, as the reference's round()).
    assert CosineBits(b_max=4, b_min=1).bits_at(BitContext(1, 2)) == 2
    # b_min=2, b_max=5: 2 + 1.5 = 3.5 -> 4.
    assert CosineBits(b_max=5, b_min=2).bits_at(BitContext(1, 2)) == 4


def test_entropy_edge_cases() -> None:
    assert label_entropy([0, 0, 17, 0]) == 0.0  # single class
    assert normalized_label_entropy([0, 0, 17, 0]) == 0.0
    assert label_entropy([5, 5, 5, 5]) == pytest.approx(2.0)
    assert normalized_label_entropy([5, 5, 5, 5]) == pytest.approx(1.0)  # uniform
    assert normalized_label_entropy([3, 1]) == pytest.approx(
        -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    )
    assert label_entropy([]) == 0.0 and label_entropy([0, 0]) == 0.0


def test_worked_example_section_2_6() -> None:
    """Two balanced digits of 10 classes, largest client: nu=0.65, 24 bits at t=0, 16 at T/2."""
    counts = (0, 0, 300, 0, 0, 0, 0, 300, 0, 0)
    ctx0 = BitContext(0, 100, num_samples=600, max_samples=600, label_counts=counts)
    assert label_entropy(counts) == pytest.approx(1.0)
    assert normalized_label_entropy(counts) == pytest.approx(0.30103, abs=1e-5)
    assert client_importance(ctx0) == pytest.approx(0.65, abs=1e-3)
    policy = ClientEntropyBits()
    assert policy.choose(TENSORS, ctx0) == {"w": 24, "b": 24}
    ctx_half = BitContext(50, 100, num_samples=600, max_samples=600, label_counts=counts)
    assert policy.choose(TENSORS, ctx_half) == {"w": 16, "b": 16}
    ctx_end = BitContext(100, 100, num_samples=600, max_samples=600, label_counts=counts)
    assert policy.bits_at(ctx_end) == 8  # all clients converge to b_min


def test_smaller_and_less_diverse_clients_get_fewer_bits() -> None:
    policy = ClientEntropyBits()
    big_uniform = BitContext(0, 10, num_samples=100, max_samples=100, label_counts=(25,) * 4)
    small_uniform = BitContext(0, 10, num_samples=20, max_samples=100, label_counts=(5,) * 4)
    big_one_class = BitContext(0, 10, num_samples=100, max_samples=100, label_counts=(100, 0, 0, 0))
    assert policy.bits_at(big_uniform) == 32  # nu = 1
    assert policy.bits_at(small_uniform) == round(8 + 24 * 0.6)  # nu = 0.5 + 0.5*0.2 = 0.6 -> 22
    assert policy.bits_at(big_one_class) == 20  # nu = 0 + 0.5 -> 8 + 12


def test_client_entropy_without_client_info_is_cosine() -> None:
    entropy, cosine = ClientEntropyBits(b_min=8, b_max=32), CosineBits(b_max=32, b_min=8)
    for t in (0, 3, 7, 10):
        server_ctx = BitContext(t, 10)
        assert entropy.choose(TENSORS, server_ctx) == cosine.choose(TENSORS, server_ctx)
    # label histogram known but n_max unknown: also degrades
    assert entropy.bits_at(BitContext(0, 10, num_samples=5, label_counts=(5, 0))) == 32


def test_client_importance_needs_client_info() -> None:
    with pytest.raises(ConfigError, match="label_counts"):
        client_importance(BitContext(0, 10))


def test_weights_change_nu() -> None:
    ctx = BitContext(0, 10, num_samples=50, max_samples=100, label_counts=(10, 10))
    assert client_importance(ctx, w_h=1.0, w_s=0.0) == pytest.approx(1.0)
    assert client_importance(ctx, w_h=0.0, w_s=1.0) == pytest.approx(0.5)
    assert ClientEntropyBits(w_h=0.0, w_s=1.0).bits_at(ctx) == 20  # 8 + 24 * 0.5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"round": -1, "total_rounds": 10}, "round must be in"),
        ({"round": 11, "total_rounds": 10}, "round must be in"),
        ({"round": 0, "total_rounds": 0}, "total_rounds must be >= 1"),
        ({"round": 0, "total_rounds": 5, "num_samples": 9, "max_samples": 4}, "exceeds"),
        ({"round": 0, "total_rounds": 5, "label_counts": (1, -1)}, "label_counts"),
    ],
)
def test_bit_context_validation(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        BitContext(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("factory", "needle"),
    [
        (lambda: CosineBits(b_max=8, b_min=9), "b_min"),
        (lambda: CosineBits(b_max=33, b_min=8), r"b_max must be in 1\.\.32"),
        (lambda: CosineBits(b_max=8, b_min=0), r"b_min must be in 1\.\.32"),
        (lambda: FixedBits(0), r"1\.\.32"),
        (lambda: FixedBits(8.0), "integer"),  # type: ignore[arg-type]
        (lambda: ClientEntropyBits(w_h=-0.1), "w_h"),
        (lambda: ClientEntropyBits(w_h=0.8, w_s=0.8), "w_h \\+ w_s"),
    ],
)
def test_parameter_validation(factory: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        factory()  # type: ignore[operator]
