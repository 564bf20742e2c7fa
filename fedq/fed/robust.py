"""Robust aggregation: how the server combines the round's decoded updates into the one delta
its optimizer (FedAvg, FedProx, FedAdam) applies.

Pure functions of the updates, given in roster order, so the result never depends on when an
update arrived (ties are broken by that order). ``mean`` is FedAvg's weighted mean; the others
treat every update equally and bound what a minority of clients can do to the result:

- coordinate-wise ``median`` (Yin et al. 2018): with fewer than half of the updates hostile, each
  coordinate lies within the range of the honest updates' values;
- coordinate-wise ``trimmed_mean`` (Yin et al. 2018): per coordinate, drop the ``floor(b * n)``
  smallest and largest values and average the rest;
- (multi-)``krum`` (Blanchard et al. 2017): score each update by the summed squared distance to
  its ``n - f - 2`` nearest others, average the ``m`` best-scored.

An L2 clip of every update (:func:`clip_updates`) may come first, whatever the aggregator
(docs/algorithms.md, "Defences").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedq.config import DefenceConfig
from fedq.privacy import clip_l2
from fedq.rounds import weighted_mean

State = dict[str, torch.Tensor]
Weighted = Sequence[tuple[Mapping[str, torch.Tensor], float]]

__all__ = [
    "AGGREGATORS",
    "aggregate",
    "clip_updates",
    "combine",
    "coordinate_median",
    "krum",
    "krum_scores",
    "trimmed_mean",
    "update_norm",
]


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all of ``delta``'s tensors together (float64 accumulation)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def clip_updates(updates: Weighted, bound: float | None) -> list[tuple[State, float]]:
    """Every update scaled so its L2 norm is at most ``bound`` (unchanged when ``bound`` is
    None or the update is within it); weights kept."""
    if bound is None:
        return [(dict(d), w) for d, w in updates]
    return [(clip_l2(d, bound)[0], w) for d, w in updates]


def _stacked(states: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    return torch.stack([s[name].float() for s in states])


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """Per coordinate, the median of the updates' values (the mean of the two middle values for
    an even count)."""
    if not states:
        raise ValueError("the median needs at least one update")
    n = len(states)
    out: State = {}
    for name in states[0]:
        s = _stacked(states, name).sort(dim=0, stable=True).values
        lo, hi = s[(n - 1) // 2], s[n // 2]
        out[name] = lo if n % 2 else (lo + hi) / 2
    return out


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], fraction: float) -> State:
    """Per coordinate, the mean of the values left after dropping the ``floor(fraction * n)``
    smallest and as many largest; ``fraction`` 0 is the plain (unweighted) mean."""
    n = len(states)
    k = math.floor(fraction * n)
    if n - 2 * k < 1:
        raise ValueError(f"trimming {k} of {n} updates at each end leaves none")
    out: State = {}
    for name in states[0]:
        s = _stacked(states, name)
        if k:
            s = s.sort(dim=0, stable=True).values[k : n - k]
        out[name] = s.mean(dim=0)
    return out


def krum_scores(states: Sequence[Mapping[str, torch.Tensor]], f: int) -> list[float]:
    """Krum's score of each update: the sum of squared L2 distances to its ``n - f - 2`` nearest
    other updates (at least one). Distances in float64."""
    n = len(states)
    flat = torch.stack([torch.cat([s[k].double().flatten() for k in states[0]]) for s in states])
    dist = torch.cdist(flat, flat).pow(2)
    near = max(n - f - 2, 1)
    scores = []
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        scores.append(float(others.sort().values[:near].sum()) if n > 1 else 0.0)
    return scores


def krum(states: Sequence[Mapping[str, torch.Tensor]], f: int, m: int = 1) -> State:
    """(Multi-)Krum: the unweighted mean of the ``m`` updates with the lowest scores (ties go to
    the earlier update in roster order)."""
    if not states:
        raise ValueError("Krum needs at least one update")
    scores = krum_scores(states, f)
    order = sorted(range(len(states)), key=lambda i: (scores[i], i))
    chosen = sorted(order[: max(1, min(m, len(states)))])
    return trimmed_mean([states[i] for i in chosen], 0.0)


AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")


def combine(cfg: DefenceConfig, updates: Weighted) -> State:
    """The round's delta from its (delta, weight) updates in roster order, as ``cfg`` says:
    clip first (``clip_norm``), then the aggregator."""
    return aggregate(cfg, clip_updates(updates, cfg.clip_norm))


def aggregate(cfg: DefenceConfig, pairs: Weighted) -> State:
    """``cfg.aggregator`` over already clipped (delta, weight) pairs in roster order: ``mean`` is
    weighted, the others treat every update equally."""
    if not pairs:
        raise ValueError("no updates to combine")
    states = [d for d, _ in pairs]
    if cfg.aggregator == "mean":
        return weighted_mean(pairs)
    if cfg.aggregator == "median":
        return coordinate_median(states)
    if cfg.aggregator == "trimmed_mean":
        return trimmed_mean(states, cfg.trim_fraction)
    if cfg.aggregator == "krum":
        return krum(states, cfg.krum_f, cfg.krum_m)
    raise ValueError(f"unknown aggregator {cfg.aggregator!r}; known: {AGGREGATORS}")
