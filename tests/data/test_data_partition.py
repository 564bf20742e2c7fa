"""Partitioners: disjoint, covering, reproducible, and skewed the way each scheme promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.data import SCHEMES, label_histogram, partition
from fedq.errors import ConfigError


def _labels(n: int = 2000, k: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, k, n))


def _assert_disjoint(parts: list[torch.Tensor]) -> torch.Tensor:
    allidx = torch.cat(parts)
    assert allidx.numel() == torch.unique(allidx).numel(), "a sample went to two clients"
    return allidx


def _entropy(hist: torch.Tensor) -> float:
    p = hist.double() / hist.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_iid_and_dirichlet_are_disjoint_cover_all_and_nonempty(scheme: str) -> None:
    y = _labels()
    parts = partition(y, 7, scheme, seed=3, alpha=0.3)
    assert len(parts) == 7
    allidx = _assert_disjoint(parts)
    assert torch.equal(torch.sort(allidx).values, torch.arange(len(y)))
    assert all(p.numel() >= 1 and p.dtype == torch.int64 for p in parts)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_same_seed_same_shards_other_seed_other_shards(scheme: str) -> None:
    y = _labels()
    a = partition(y, 5, scheme, seed=11)
    b = partition(y, 5, scheme, seed=11)
    c = partition(y, 5, scheme, seed=12)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_iid_sizes_are_balanced() -> None:
    sizes = [p.numel() for p in partition(_labels(1003), 10, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_small_alpha_is_more_skewed_than_large_alpha() -> None:
    y = _labels(5000)

    def mean_entropy(alpha: float) -> float:
        parts = partition(y, 10, "dirichlet", seed=0, alpha=alpha)
        return sum(_entropy(label_histogram(y, p, 10)) for p in parts) / len(parts)

    skewed, flat = mean_entropy(0.1), mean_entropy(100.0)
    assert skewed < flat - 0.5
    assert flat > 0.95 * math.log(10)  # nearly uniform labels per client


def test_dirichlet_respects_min_size() -> None:
    parts = partition(_labels(), 10, "dirichlet", seed=0, alpha=0.5, min_size=40)
    assert min(p.numel() for p in parts) >= 40


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="larger alpha"):
        partition(_labels(200), 20, "dirichlet", seed=0, alpha=0.01, min_size=9, max_tries=5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_classes_gives_exactly_k_classes_per_client_and_covers_classes(k: int) -> None:
    y = _labels()
    parts = partition(y, 8, "classes", seed=1, classes_per_client=k)
    _assert_disjoint(parts)
    held: set[int] = set()
    for p in parts:
        present = torch.unique(y[p]).tolist()
        assert len(present) == k
        held.update(present)
    if 8 * k >= 10:
        assert held == set(range(10))


def test_classes_drops_unheld_classes_only() -> None:
    y = _labels()
    parts = partition(y, 3, "classes", seed=0, classes_per_client=2)  # 6 of 10 classes held
    held = torch.unique(y[torch.cat(parts)])
    assert held.numel() == 6
    assert torch.cat(parts).numel() == int(torch.isin(y, held).sum())


def test_label_histogram_counts_the_slice() -> None:
    y = torch.tensor([0, 1, 1, 2, 2, 2])
    h = label_histogram(y, torch.tensor([1, 3, 4, 5]), 4)
    assert h.tolist() == [0, 1, 3, 0]
    with pytest.raises(ConfigError):
        label_histogram(y, torch.arange(6), 2)


def test_bad_requests_raise_config_error() -> None:
    y = _labels(50)
    with pytest.raises(ConfigError, match="iid, dirichlet, classes"):
        partition(y, 2, "shards", seed=0)
    with pytest.raises(ConfigError, match="cannot give"):
        partition(y, 51, "iid", seed=0)
    with pytest.raises(ConfigError, match="classes_per_client"):
        partition(y, 2, "classes", seed=0, classes_per_client=11)
    with pytest.raises(ConfigError, match="alpha"):
        partition(y, 2, "dirichlet", seed=0, alpha=0.0)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 400),
    clients=st.integers(1, 10),
    classes=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    scheme=st.sampled_from(["iid", "dirichlet"]),
)
def test_partition_property_disjoint_and_covering(
    n: int, clients: int, classes: int, seed: int, scheme: str
) -> None:
    y = _labels(n, classes, seed)
    parts = partition(y, clients, scheme, seed=seed, alpha=1.0)
    allidx = _assert_disjoint(parts)
    assert allidx.numel() == n
    assert all(p.numel() >= 1 for p in parts)
