"""Robust aggregators as pure functions: the median stays in the honest range with a minority of
outliers, Krum picks honest updates, the trimmed mean with no trim is the unweighted mean,
clipping bounds every update's norm, and the result does not depend on anything but the order
given (the roster's)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.config import DefenceConfig
from fedq.fed.robust import (
    clip_updates,
    combine,
    coordinate_median,
    krum,
    krum_scores,
    trimmed_mean,
    update_norm,
)
from fedq.rounds import weighted_mean


def _states(values: list[list[float]]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(v, dtype=torch.float32)} for v in values]


@settings(max_examples=60, deadline=None)
@given(
    honest=st.lists(
        st.lists(st.floats(-10, 10, width=32), min_size=3, max_size=3), min_size=3, max_size=8
    ),
    scale=st.sampled_from([1e3, -1e6, 3e30]),
    data=st.data(),
)
def test_median_with_a_minority_of_outliers_stays_in_the_honest_range(
    honest: list[list[float]], scale: float, data: st.DataObject
) -> None:
    bad = data.draw(st.integers(0, len(honest) - 1))  # a strict minority of all updates
    outliers = [[scale * (i + 1)] * 3 for i in range(bad)]
    out = coordinate_median(_states(honest + outliers))["w"]
    h = torch.tensor(honest)
    assert bool((out >= h.min(0).values).all()) and bool((out <= h.max(0).values).all())


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    out = coordinate_median(_states([[1.0], [4.0], [2.0], [100.0]]))["w"]
    assert out.tolist() == [3.0]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-1e3, 1e3, width=32), min_size=4, max_size=4), min_size=1, max_size=7
    )
)
def test_trimmed_mean_without_trim_is_the_unweighted_mean(values: list[list[float]]) -> None:
    states = _states(values)
    expected = weighted_mean([(s, 1.0) for s in states])["w"]
    assert torch.allclose(trimmed_mean(states, 0.0)["w"], expected, atol=1e-3, rtol=1e-5)


def test_trimmed_mean_drops_each_end() -> None:
    out = trimmed_mean(_states([[-1e9], [1.0], [2.0], [3.0], [1e9]]), 0.2)["w"]
    assert out.tolist() == [2.0]


def test_krum_picks_honest_updates_and_multi_krum_averages_them() -> None:
    gen = torch.Generator().manual_seed(0)
    honest = [{"w": torch.randn(50, generator=gen) * 0.1 + 1.0} for _ in range(7)]
    attackers = [{"w": torch.full((50,), -20.0)}, {"w": torch.randn(50, generator=gen) * 30}]
    states = honest[:3] + attackers + honest[3:]  # attackers in the middle of the roster
    scores = krum_scores(states, f=2)
    assert min(scores[3], scores[4]) > max(s for i, s in enumerate(scores) if i not in (3, 4))
    one = krum(states, f=2, m=1)["w"]
    assert any(torch.equal(one, h["w"]) for h in honest)
    five = krum(states, f=2, m=5)["w"]
    assert float((five - 1.0).abs().max()) < 0.5


def test_krum_breaks_ties_by_roster_order() -> None:
    pair = _states([[5.0], [7.0]])  # equal scores: the earlier update in the roster wins
    assert krum(pair, f=0)["w"].tolist() == [5.0]
    assert krum(pair[::-1], f=0)["w"].tolist() == [7.0]


def test_clipping_bounds_each_update_and_keeps_small_ones() -> None:
    small = {"a": torch.tensor([0.3, 0.4])}
    big = {"a": torch.tensor([30.0, 40.0]), "b": torch.tensor([0.0])}
    out = clip_updates([(small, 2.0), (big, 5.0)], 1.0)
    assert torch.equal(out[0][0]["a"], small["a"]) and out[1][1] == 5.0
    assert update_norm(out[1][0]) <= 1.0 and update_norm(out[1][0]) > 0.99
    assert clip_updates([(big, 1.0)], None)[0][0]["a"] is big["a"]


@pytest.mark.parametrize("aggregator", ["mean", "median", "trimmed_mean", "krum"])
def test_combine_follows_the_config(aggregator: str) -> None:
    gen = torch.Generator().manual_seed(1)
    updates = [({"w": torch.randn(8, generator=gen)}, float(i + 1)) for i in range(6)]
    cfg = dataclasses.replace(DefenceConfig(), aggregator=aggregator)  # type: ignore[arg-type]
    out = combine(cfg, updates)["w"]
    states = [d for d, _ in updates]
    expected = {
        "mean": weighted_mean(updates),
        "median": coordinate_median(states),
        "trimmed_mean": trimmed_mean(states, cfg.trim_fraction),
        "krum": krum(states, cfg.krum_f, cfg.krum_m),
    }[aggregator]["w"]
    assert torch.equal(out, expected)
    clipped = combine(dataclasses.replace(cfg, clip_norm=0.5), updates)
    assert update_norm(clipped) <= 0.5 + 1e-6
