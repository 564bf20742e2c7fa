"""Server strategies (Flower-style): client selection and aggregation of decoded client updates.

Clients send *deltas* (local model minus the global model they received); aggregation is pure
tensor arithmetic, so every strategy here is testable without any transport.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedq.config import FedConfig
from fedq.errors import ConfigError

State = dict[str, torch.Tensor]


def weighted_mean(updates: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> State:
    """Sample-weighted mean of deltas: sum_i n_i * d_i / sum_i n_i (FedAvg, McMahan et al. 2017)."""
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


class Strategy:
    """FedAvg: uniform sampling of K of N clients, sample-weighted averaging of deltas."""

    name = "fedavg"

    def __init__(self, cfg: FedConfig) -> None:
        self.cfg = cfg

    def select(
        self, round_idx: int, num_clients: int, k: int, seed: int, eligible: list[int] | None = None
    ) -> list[int]:
        """K distinct clients (from ``eligible`` if given), reproducible from (seed, round)."""
        pool = list(range(num_clients)) if eligible is None else list(eligible)
        g = torch.Generator().manual_seed(seed * 1_000_003 + round_idx)
        order = torch.randperm(len(pool), generator=g)[:k].tolist()
        return sorted(pool[i] for i in order)

    def client_scalars(self) -> dict[str, float]:
        """Hyper-parameters the strategy sends to clients with each task."""
        return {}

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[tuple[State, float]]
    ) -> State:
        """New global state from the round's (delta, num_samples) updates."""
        return self.apply(global_state, weighted_mean(updates))

    def apply(self, global_state: Mapping[str, torch.Tensor], mean_delta: State) -> State:
        """New global state from an already averaged delta (central DP privatizes the mean and
        calls this directly, so every strategy composes with it)."""
        return {k: (v.float() + mean_delta[k]).to(v.dtype) for k, v in global_state.items()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class FedProx(Strategy):
    """FedProx (Li et al. 2020): FedAvg aggregation; clients add (mu/2)||w - w_global||^2."""

    name = "fedprox"

    def client_scalars(self) -> dict[str, float]:
        return {"proximal_mu": self.cfg.proximal_mu}


class FedAdam(Strategy):
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): the mean delta is a
    pseudo-gradient for a server-side Adam step with lr ``server_lr`` and adaptivity ``tau``."""

    name = "fedadam"

    def __init__(self, cfg: FedConfig) -> None:
        super().__init__(cfg)
        self.m: State = {}
        self.v: State = {}

    def apply(self, global_state: Mapping[str, torch.Tensor], mean_delta: State) -> State:
        mean = mean_delta
        c = self.cfg
        out: State = {}
        for k, w in global_state.items():
            d = mean[k]
            m = self.m.get(k, torch.zeros_like(d)).mul_(c.beta1).add_(d, alpha=1 - c.beta1)
            v = self.v.get(k, torch.zeros_like(d)).mul_(c.beta2).addcmul_(d, d, value=1 - c.beta2)
            self.m[k], self.v[k] = m, v
            out[k] = (w.float() + c.server_lr * m / (v.sqrt() + c.tau)).to(w.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "m": {k: t.clone() for k, t in self.m.items()},
            "v": {k: t.clone() for k, t in self.v.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m = {k: t.clone() for k, t in state.get("m", {}).items()}
        self.v = {k: t.clone() for k, t in state.get("v", {}).items()}


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Strategy, FedProx, FedAdam)}


def make_strategy(cfg: FedConfig) -> Strategy:
    try:
        return STRATEGIES[cfg.strategy](cfg)
    except KeyError:
        raise ConfigError(
            f"fed.strategy: unknown {cfg.strategy!r}; registered: {sorted(STRATEGIES)}"
        ) from None
