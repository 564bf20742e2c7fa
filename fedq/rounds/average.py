"""Sample-weighted averaging of tensor dicts: FedAvg of federated deltas and of split clients'
state alike (McMahan et al. 2017)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

State = dict[str, torch.Tensor]


def weighted_mean(updates: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> State:
    """``sum_i n_i * d_i / sum_i n_i`` over ``(tensors, n)`` pairs, in float32."""
    total = float(sum(w for _, w in updates))
    if not updates or total <= 0:
        raise ValueError("weighted_mean needs at least one update with positive weight")
    out: State = {}
    for name in updates[0][0]:
        acc = torch.zeros_like(updates[0][0][name], dtype=torch.float32)
        for delta, w in updates:
            acc.add_(delta[name].float(), alpha=w / total)
        out[name] = acc
    return out
