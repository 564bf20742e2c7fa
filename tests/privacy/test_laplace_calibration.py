"""Sensitivity and scale of Ardic & Genc's Laplace mechanism (docs/algorithms.md §2.3),
hand-computed."""

from __future__ import annotations

import math

import pytest
import torch

from fedq.errors import ConfigError
from fedq.privacy import SmoothnessEstimator, laplace_scale, laplace_sensitivity


def test_sensitivity_lambda_zero_branch() -> None:
    # s = 2 eta C E / |D| = 2 * 0.1 * 1 * 2 / 100
    assert laplace_sensitivity(1.0, 0.1, 2, 100, 0.0) == pytest.approx(0.004)
    assert laplace_sensitivity(1.0, 0.1, 2, 100, 1e-12) == pytest.approx(0.004)


def test_sensitivity_lambda_positive_before_e0() -> None:
    # lambda = 1, eta = 0.1: E0 = ln(101) / ln(1.1) ~ 48.4 > E = 2,
    # s = 2C / (lambda |D|) * ((1 + lambda eta)^E - 1) = 2/100 * (1.21 - 1) = 0.0042
    assert laplace_sensitivity(1.0, 0.1, 2, 100, 1.0) == pytest.approx(0.0042)


def test_sensitivity_lambda_positive_after_e0() -> None:
    # lambda = 100, eta = 0.1, |D| = 10: E0 = ln(11) / ln(11) = 1 <= E = 3,
    # s = 2C + 2 eta C (E - E0) = 2 + 0.2 * 2 = 2.4 (C = 1)
    assert laplace_sensitivity(1.0, 0.1, 3, 10, 100.0) == pytest.approx(2.4)
    assert laplace_sensitivity(0.5, 0.1, 3, 10, 100.0) == pytest.approx(1.2)  # linear in C


def test_sensitivity_small_lambda_tends_to_zero_branch() -> None:
    near = laplace_sensitivity(1.0, 0.1, 2, 100, 1e-6)
    assert near == pytest.approx(laplace_sensitivity(1.0, 0.1, 2, 100, 0.0), rel=1e-5)
    assert near > 0.004  # (1 + x)^E - 1 > E x


def test_scale_formula() -> None:
    # T_L = (T / E) * (K / N) = (100 / 2) * (10 / 100) = 5; b = s T_L / eps = 0.5 * 5 / 2
    assert laplace_scale(0.5, 2.0, 100, 2, 10, 100) == pytest.approx(1.25)


def test_calibration_rejects_impossible_values() -> None:
    with pytest.raises(ConfigError, match="dataset_size"):
        laplace_sensitivity(1.0, 0.1, 2, 0, 0.0)
    with pytest.raises(ConfigError, match="smoothness_lambda"):
        laplace_sensitivity(1.0, 0.1, 2, 10, -1.0)
    with pytest.raises(ConfigError, match="clients_per_round"):
        laplace_scale(1.0, 1.0, 10, 1, 20, 10)
    with pytest.raises(ConfigError, match="epsilon"):
        laplace_scale(1.0, 0.0, 10, 1, 1, 10)


def test_smoothness_estimator_pairs_same_batch_index_across_epochs() -> None:
    est = SmoothnessEstimator()
    w0, g0 = [torch.zeros(3)], [torch.zeros(3)]
    est.record(0, w0, g0)
    est.record(1, [torch.ones(3)], [torch.ones(3) * 10])  # batch 1, epoch 1: no pair yet
    assert est.value == 0.0 and est.pairs == 0
    # epoch 2, batch 0: ||dg||_1 / ||dw||_1 = 6 / 3 = 2
    est.record(0, [torch.ones(3)], [torch.full((3,), 2.0)])
    assert est.value == pytest.approx(2.0)
    # epoch 2, batch 1 (dicts work too): ||dg||_1 = 3 * 5, ||dw||_1 = 3 * 0.5 -> 10 (the max)
    est.record(1, {"w": torch.full((3,), 1.5)}, {"g": torch.full((3,), 15.0)})
    assert est.value == pytest.approx(10.0) and est.pairs == 2
    # a smaller ratio later does not lower the max; identical weights are skipped (no 0/0)
    est.record(0, [torch.full((3,), 2.0)], [torch.full((3,), 2.5)])
    est.record(0, [torch.full((3,), 2.0)], [torch.full((3,), 9.0)])
    assert est.value == pytest.approx(10.0) and est.pairs == 3


def test_smoothness_of_a_quadratic_is_its_curvature() -> None:
    # loss = (a/2) ||w||^2 has gradient a w, so lambda = a exactly on any pair of points
    a = 3.0
    est = SmoothnessEstimator()
    g = torch.Generator().manual_seed(0)
    for _epoch in range(3):
        for batch in range(4):
            w = torch.randn(10, generator=g)
            est.record(batch, [w], [a * w])
    assert est.value == pytest.approx(a, rel=1e-6)
    assert not math.isnan(est.value)
