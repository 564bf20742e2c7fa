"""Server strategies (Flower-style): how decoded client updates become the new global model.

Clients send *deltas* (local model minus the global model they received); aggregation is pure
tensor arithmetic, so every strategy here is testable without any transport. Which clients take
part is the round engine's (:func:`fedq.rounds.select_clients`), shared with split mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedq.config import FedConfig
from fedq.errors import ConfigError
from fedq.rounds import weighted_mean

State = dict[str, torch.Tensor]


class Strategy:
    """FedAvg: sample-weighted averaging of deltas."""

    name = "fedavg"

    def __init__(self, cfg: FedConfig) -> None:
        self.cfg = cfg

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
            m0, v0 = self.m.get(k), self.v.get(k)  # a resumed state may sit on another device
            m0 = torch.zeros_like(d) if m0 is None else m0.to(d.device)
            v0 = torch.zeros_like(d) if v0 is None else v0.to(d.device)
            m = m0.mul_(c.beta1).add_(d, alpha=1 - c.beta1)
            v = v0.mul_(c.beta2).addcmul_(d, d, value=1 - c.beta2)
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
