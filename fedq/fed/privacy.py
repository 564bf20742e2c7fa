"""Differential privacy in the federated loop: planning, accounting, the budget stop, and the
per-mechanism steps on each side. The maths lives in :mod:`fedq.privacy`; this module decides
*when* each piece runs (docs/algorithms.md §5.26: update -> clip -> noise -> quantize).

Accounting happens when a round opens, for every selected client, before any release: a client
that drops out later has still been charged (conservative). A round that would push the central
accountant past the target, or a run with fewer clients inside their budget than one round needs,
stops *before* the release, with the reason in ``summary.json``. The ledger is checkpointed with
the server, so resuming never resets the privacy spent.

Approximations (stated, not hidden): the strategy samples exactly K of N clients, while the RDP /
PRV accountants assume Poisson sampling at rate K/N (as Flower's and TFF's DP-FedAvg do).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedq.config import PrivacyConfig, RunConfig
from fedq.fed.strategy import State
from fedq.privacy import (
    BudgetGuard,
    GaussianAccountant,
    GaussianMechanism,
    PureEpsilonLedger,
    clip_l1,
    clip_l2,
    expected_epsilon,
    plan_noise_multiplier,
)
from fedq.rounds import weighted_mean

log = logging.getLogger(__name__)


def local_steps(n: int, batch_size: int, epochs: int) -> tuple[int, float]:
    """(DP-SGD steps per participation, Poisson sample rate) of a client with n examples."""
    per_epoch = max(1, math.ceil(n / batch_size))
    return epochs * per_epoch, 1.0 / per_epoch


def laplace_participations(cfg: RunConfig) -> float:
    """Releases the per-client budget is split over. ``sound``: the expected participations
    ceil(T*K/N). ``paper``: T_L = (T/E)*(K/N) of Ardic & Genc (docs/algorithms.md §2.3), kept for a
    faithful replication although dividing by E is not a composition argument."""
    f = cfg.fed
    if cfg.privacy.laplace_calibration == "paper":
        return max(f.rounds / cfg.train.local_epochs * f.clients_per_round / f.num_clients, 1e-9)
    return float(math.ceil(f.rounds * f.clients_per_round / f.num_clients))


class ServerPrivacy:
    """The server's side: plan, account, guard (the round engine's :class:`Ledger`), and central
    clipping + noise. Client sizes come from registration (roster index -> local examples); the
    noise multiplier is planned once, from the sizes known when the first round opens, and kept
    in the checkpoint."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.p: PrivacyConfig = cfg.privacy
        p, f = self.p, cfg.fed
        self.guard = BudgetGuard(p.target_epsilon, p.delta) if p.target_epsilon else None
        self.noise_multiplier = p.noise_multiplier or 0.0
        self.planned = p.noise_multiplier is not None or p.mechanism not in ("central", "dpsgd")
        self.sample_rate = f.clients_per_round / f.num_clients
        self.central: GaussianAccountant | None = None
        self.clients: dict[int, GaussianAccountant] = {}
        self.ledger = PureEpsilonLedger()
        self.eps_per_release = 0.0
        if p.mechanism == "central":
            self.central = GaussianAccountant(p.accountant, p.delta)
        elif p.mechanism == "laplace":
            assert p.target_epsilon is not None
            self.eps_per_release = p.target_epsilon / laplace_participations(cfg)

    @property
    def enabled(self) -> bool:
        return self.p.mechanism != "none"

    def _steps(self, n: int) -> tuple[int, float]:
        return local_steps(n, self.cfg.train.batch_size, self.cfg.train.local_epochs)

    def _plan(self, sizes: Mapping[int, int]) -> None:
        """Plan the noise multiplier to reach the target over the run (once)."""
        if self.planned:
            return
        p, f = self.p, self.cfg.fed
        assert p.target_epsilon is not None
        if p.mechanism == "central":
            self.noise_multiplier = plan_noise_multiplier(
                p.target_epsilon, p.delta, self.sample_rate, f.rounds, p.accountant
            )
        else:  # dpsgd: the smallest client (largest q) spends its budget fastest
            steps, q = self._steps(min(sizes.values()))
            participations = math.ceil(f.rounds * self.sample_rate)
            self.noise_multiplier = plan_noise_multiplier(
                p.target_epsilon, p.delta, q, participations * steps, p.accountant
            )
        self.planned = True

    def plan(self, sizes: Mapping[int, int]) -> dict[str, Any]:
        """The derived numbers printed before training starts."""
        p, f = self.p, self.cfg.fed
        out: dict[str, Any] = {"mechanism": p.mechanism, "target_epsilon": p.target_epsilon}
        if p.mechanism == "none":
            return out
        self._plan(sizes)
        out["delta"] = p.delta
        if p.mechanism == "central":
            out.update(
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                clip_norm=p.clip_norm,
                expected_epsilon=expected_epsilon(
                    self.noise_multiplier, self.sample_rate, f.rounds, p.delta, p.accountant
                ),
            )
        elif p.mechanism == "dpsgd":
            steps, q = self._steps(min(sizes.values()))
            parts = math.ceil(f.rounds * self.sample_rate)
            out.update(
                noise_multiplier=self.noise_multiplier,
                sample_rate=q,
                clip_norm=p.clip_norm,
                expected_epsilon=expected_epsilon(
                    self.noise_multiplier, q, parts * steps, p.delta, p.accountant
                ),
            )
        else:
            out.update(
                epsilon_per_release=self.eps_per_release,
                clip_norm=p.clip_norm,
                calibration=p.laplace_calibration,
                releases_per_client=laplace_participations(self.cfg),
            )
        return out

    # -- selection and accounting (at round open) --------------------------------------------

    def _client_eps_if(self, cid: int, n: int) -> float:
        if self.p.mechanism == "dpsgd":
            steps, q = self._steps(n)
            acc = self.clients.get(cid) or GaussianAccountant(self.p.accountant, self.p.delta)
            return acc.epsilon_if(self.noise_multiplier, q, steps)
        return self.ledger.epsilon_if(cid, self.eps_per_release)

    def eligible(self, candidates: Sequence[int], sizes: Mapping[int, int]) -> list[int]:
        """Candidates whose next participation stays within the target (all without one)."""
        if self.guard is None or self.p.mechanism not in ("dpsgd", "laplace"):
            return list(candidates)
        self._plan(sizes)
        return [c for c in candidates if self.guard.allows(self._client_eps_if(c, sizes[c]))]

    def check_round(self, sizes: Mapping[int, int], k: int) -> None:
        """Raise PrivacyBudgetExceeded if the next round's release would exceed the target."""
        self._plan(sizes)
        if self.guard is None:
            return
        if self.central is not None:
            projected = self.central.epsilon_if(self.noise_multiplier, self.sample_rate, 1)
            self.guard.check(projected, spent_epsilon=self.central.epsilon(), what="next round")
            return
        if self.p.mechanism in ("dpsgd", "laplace"):
            self.guard.check_clients(len(self.eligible(sorted(sizes), sizes)), k, self.epsilon())

    def charge(self, selected: Sequence[int], sizes: Mapping[int, int]) -> None:
        self._plan(sizes)
        if self.central is not None:
            self.central.step(self.noise_multiplier, self.sample_rate, 1)
        elif self.p.mechanism == "dpsgd":
            for cid in selected:
                steps, q = self._steps(sizes[cid])
                acc = self.clients.setdefault(
                    cid, GaussianAccountant(self.p.accountant, self.p.delta)
                )
                acc.step(self.noise_multiplier, q, steps)
        elif self.p.mechanism == "laplace":
            for cid in selected:
                self.ledger.charge(cid, self.eps_per_release)

    def epsilon(self) -> float | None:
        """Epsilon spent so far (the worst client for per-client mechanisms)."""
        if self.p.mechanism == "none":
            return None
        if self.central is not None:
            return self.central.epsilon()
        if self.p.mechanism == "dpsgd":
            return max((a.epsilon() for a in self.clients.values()), default=0.0)
        return self.ledger.max_spent()

    def disagreements(self, reported: Mapping[int, float]) -> list[int]:
        """Clients (roster indices) whose own DP-SGD accounting, reported with their update,
        differs from this ledger. The ledger charges at round open, so it may only be ahead (a
        client that did not report a round it was charged for) - never behind."""
        bad = []
        for cid, eps in reported.items():
            acc = self.clients.get(cid)
            ledger = acc.epsilon() if acc is not None else 0.0
            if eps > ledger * (1 + 1e-6) + 1e-9:
                bad.append(cid)
                log.warning("client %d reports epsilon %.6g, above the ledger's %.6g", cid, eps,
                            ledger)  # fmt: skip
        return bad

    def client_scalars(self) -> dict[str, float]:
        """What clients need to run their side of the mechanism."""
        if self.p.mechanism in ("dpsgd", "central"):
            return {"dp_noise_multiplier": self.noise_multiplier, "dp_clip": self.p.clip_norm}
        if self.p.mechanism == "laplace":
            return {"dp_clip": self.p.clip_norm, "dp_epsilon_release": self.eps_per_release}
        return {}

    # -- central aggregation ------------------------------------------------------------------

    def aggregate(
        self,
        updates: list[tuple[State, float]],
        generator: torch.Generator,
        combine: Callable[[list[tuple[State, float]]], State] = weighted_mean,
    ) -> State:
        """The round's delta. Without central DP: ``combine`` (the run's aggregator, in roster
        order; local DP composes with any). Central DP: re-clip every decoded update
        (quantization can move its norm), unweighted sum over the planned K clients, Gaussian
        noise std z*C/K; its sensitivity argument needs that sum, so the config allows only the
        mean aggregator with it and ``combine`` is not used."""
        if self.central is None:
            return combine(updates)
        k = self.cfg.fed.clients_per_round
        mech = GaussianMechanism(self.p.clip_norm, self.noise_multiplier)
        clipped = [clip_l2(d, self.p.clip_norm)[0] for d, _ in updates]
        total = {name: torch.stack([c[name] for c in clipped]).sum(0) / k for name in clipped[0]}
        noise = mech.noise(total, generator, scale_divisor=k)
        return {name: t + noise[name] for name, t in total.items()}

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}  # nothing to account, nothing to journal
        return {
            "noise_multiplier": self.noise_multiplier if self.planned else None,
            "central": self.central.state_dict() if self.central is not None else None,
            "clients": {int(c): a.state_dict() for c, a in self.clients.items()},
            "ledger": self.ledger.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("noise_multiplier") is not None:  # the plan the run was charged with
            self.noise_multiplier = float(state["noise_multiplier"])
            self.planned = True
        if self.central is not None and state.get("central") is not None:
            self.central.load_state_dict(state["central"])
        self.clients = {}
        for cid, s in state.get("clients", {}).items():
            acc = GaussianAccountant(self.p.accountant, self.p.delta)
            acc.load_state_dict(s)
            self.clients[int(cid)] = acc
        self.ledger.load_state_dict(state.get("ledger", self.ledger.state_dict()))


def privatize_update(
    delta: Mapping[str, torch.Tensor],
    mechanism: str,
    scalars: Mapping[str, float],
    generator: torch.Generator,
    *,
    laplace_sensitivity: float | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Client side, before bits and quantization: (update to send, its pre-clip norm).

    - central: L2 clip (the noise is added once, to the aggregate, by the server).
    - laplace, sound calibration: L1-clip the update to C, so any two updates differ by at most
      2C in L1; Laplace noise of scale 2C / eps_release makes each release eps_release-DP.
    - laplace, paper calibration (``laplace_sensitivity`` given): no update clipping (the paper
      clips each mini-batch gradient in L1 instead), scale = s / eps_release = s * T_L / eps with
      the paper's heuristic sensitivity s (docs/algorithms.md §2.3).
    - otherwise unchanged (DP-SGD already privatized the training itself).
    """
    from fedq.privacy import LaplaceMechanism

    if mechanism == "central":
        return clip_l2(delta, scalars["dp_clip"])
    if mechanism == "laplace":
        eps = scalars["dp_epsilon_release"]
        if laplace_sensitivity is not None:
            norm = float(sum(t.abs().sum() for t in delta.values()))
            noised = LaplaceMechanism(laplace_sensitivity / eps).privatize(delta, generator)
            return noised, norm
        clip = scalars["dp_clip"]
        clipped, norm = clip_l1(delta, clip)
        return LaplaceMechanism(2.0 * clip / eps).privatize(clipped, generator), norm
    return dict(delta), float("nan")
