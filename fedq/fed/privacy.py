"""Differential privacy in the federated loop: planning, accounting, the budget stop, and the
per-mechanism steps on each side. The maths lives in :mod:`fedq.privacy`; this module decides
*when* each piece runs (docs/algorithms.md §5.26: update -> clip -> noise -> quantize).

Accounting happens when a round opens, for every selected client, before any release: a client
that drops out later has still been charged (conservative). A round that would push the central
accountant past the target, or a run with fewer clients inside their budget than one round needs,
stops *before* the release, with the reason in ``summary.json``. The ledger is checkpointed with
the server, so resuming never resets the privacy spent.

Each mechanism is one class (:class:`ServerPrivacy` is the run without DP; :class:`DpsgdPrivacy`,
:class:`CentralPrivacy`, :class:`LaplacePrivacy`) registered by name in :data:`MECHANISMS`; the
server builds its ledger with :func:`make_privacy`, and a client finds its side of the mechanism
(class methods) with :func:`mechanism_class` from its task's tag. docs/design.md §4 says how to
add one.

Approximations (stated, not hidden): the strategy samples exactly K of N clients, while the RDP /
PRV accountants assume Poisson sampling at rate K/N (as Flower's and TFF's DP-FedAvg do).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from fedq.config import PrivacyConfig, RunConfig
from fedq.errors import ConfigError
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
    faithful replication although dividing by E is not a composition argument; at least 1: a
    T_L below 1 (few rounds, few clients per round or many epochs) would charge each release more
    than the whole budget, so the ledger could let no client take part at all."""
    f = cfg.rounds
    if cfg.privacy.laplace_calibration == "paper":
        return max(f.count / cfg.train.local_epochs * f.clients_per_round / f.num_clients, 1.0)
    return float(math.ceil(f.count * f.clients_per_round / f.num_clients))


class ServerPrivacy:
    """One privacy mechanism on the server: plan, account, guard (the round engine's
    :class:`~fedq.rounds.workload.Ledger`) and, for central DP, clipping + noise of the aggregate.
    Client sizes come from registration (roster index -> local examples); a mechanism that plans
    its noise multiplier does so once, from the sizes known when the first round opens, and keeps
    it in the checkpoint.

    This base class is the run without differential privacy (``none``); each mechanism is a
    subclass in :data:`MECHANISMS` (build one with :func:`make_privacy`). The checkpoint layout is
    the same for every mechanism (``noise_multiplier``, ``central``, ``clients``, ``ledger``; an
    unused part stays empty), so a checkpoint written before the mechanisms were split loads."""

    name = "none"
    enabled = False  # False: nothing to account, nothing to journal
    plans_noise = False  # True: the noise multiplier is planned from the target when not given
    per_client = False  # True: the budget is per client (eligible / check_clients filter)
    local_dpsgd = False  # True: clients train with DP-SGD (client side, fedq.fed.client)

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.p: PrivacyConfig = cfg.privacy
        p, f = self.p, cfg.rounds
        self.guard = BudgetGuard(p.target_epsilon, p.delta) if p.target_epsilon else None
        self.noise_multiplier = p.noise_multiplier or 0.0
        self.planned = p.noise_multiplier is not None or not self.plans_noise
        self.sample_rate = f.clients_per_round / f.num_clients

    def _steps(self, n: int) -> tuple[int, float]:
        return local_steps(n, self.cfg.train.batch_size, self.cfg.train.local_epochs)

    def _plan(self, sizes: Mapping[int, int]) -> None:
        """Plan the noise multiplier to reach the target over the run (once)."""
        if self.planned:
            return
        assert self.p.target_epsilon is not None
        self.noise_multiplier = self._planned_noise(sizes)
        self.planned = True

    def _planned_noise(self, sizes: Mapping[int, int]) -> float:
        """Hook of the mechanisms that plan noise to a target (DP-SGD, central); the others
        never reach it (``_plan`` runs only with a target)."""
        raise NotImplementedError(f"mechanism {self.name!r} plans no noise multiplier")

    def plan(self, sizes: Mapping[int, int]) -> dict[str, Any]:
        """The derived numbers printed before training starts."""
        p = self.p
        out: dict[str, Any] = {"mechanism": p.mechanism, "target_epsilon": p.target_epsilon}
        if not self.enabled:
            return out
        self._plan(sizes)
        out["delta"] = p.delta
        out.update(self._plan_numbers(sizes))
        return out

    def _plan_numbers(self, sizes: Mapping[int, int]) -> dict[str, Any]:
        """The mechanism's own entries of :meth:`plan` (after ``delta``)."""
        return {}

    # -- selection and accounting (at round open) --------------------------------------------

    def _client_eps_if(self, cid: int, n: int) -> float:
        """Client ``cid``'s epsilon if it took part in the next round: a hook of the per-client
        mechanisms (DP-SGD, Laplace), called only when ``per_client`` is set."""
        raise NotImplementedError(f"mechanism {self.name!r} keeps no per-client accounting")

    def eligible(self, candidates: Sequence[int], sizes: Mapping[int, int]) -> list[int]:
        """Candidates whose next participation stays within the target (all without one)."""
        if self.guard is None or not self.per_client:
            return list(candidates)
        self._plan(sizes)
        return [c for c in candidates if self.guard.allows(self._client_eps_if(c, sizes[c]))]

    def check_round(self, sizes: Mapping[int, int], k: int) -> None:
        """Raise PrivacyBudgetExceeded if the next round's release would exceed the target."""
        self._plan(sizes)
        if self.guard is not None and self.per_client:
            self.guard.check_clients(len(self.eligible(sorted(sizes), sizes)), k, self.epsilon())

    def charge(self, selected: Sequence[int], sizes: Mapping[int, int]) -> None:
        self._plan(sizes)

    def epsilon(self) -> float | None:
        """Epsilon spent so far (the worst client for per-client mechanisms)."""
        return None

    def client_epsilon(self, cid: int) -> float:
        """What this ledger charged client ``cid`` so far in DP-SGD steps (0 without them)."""
        return 0.0

    def disagreements(self, reported: Mapping[int, float]) -> list[int]:
        """Clients (roster indices) whose own DP-SGD accounting, reported with their update,
        differs from this ledger. The ledger charges at round open, so it may only be ahead (a
        client that did not report a round it was charged for) - never behind."""
        bad = []
        for cid, eps in reported.items():
            ledger = self.client_epsilon(cid)
            if eps > ledger * (1 + 1e-6) + 1e-9:
                bad.append(cid)
                log.warning(
                    "client %d reports epsilon %.6g, above the ledger's %.6g", cid, eps, ledger
                )
        return bad

    def client_scalars(self) -> dict[str, float]:
        """What clients need to run their side of the mechanism."""
        return {}

    # -- aggregation --------------------------------------------------------------------------

    def aggregate(
        self,
        updates: list[tuple[State, float]],
        generator: torch.Generator,
        combine: Callable[[list[tuple[State, float]]], State] = weighted_mean,
    ) -> State:
        """The round's delta: ``combine`` (the run's aggregator, in roster order; local DP
        composes with any). :class:`CentralPrivacy` overrides it."""
        return combine(updates)

    # -- the client's side (class methods: a client knows the mechanism by its task's tag) ----

    @classmethod
    def smoothness_calibrated(cls, calibration: str) -> bool:
        """Whether, under ``privacy.laplace_calibration: calibration``, local training clips each
        mini-batch gradient in L1 and estimates the loss's smoothness for the update's
        sensitivity (Laplace, paper calibration)."""
        return False

    @classmethod
    def privatize(
        cls,
        delta: Mapping[str, torch.Tensor],
        scalars: Mapping[str, float],
        generator: torch.Generator,
        *,
        laplace_sensitivity: float | None = None,
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Client side, before bits and quantization: (update to send, its pre-clip norm).
        Without a mechanism, or with DP-SGD (which privatized the training itself): unchanged."""
        return dict(delta), float("nan")

    # -- checkpoint ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}  # nothing to account, nothing to journal
        return {
            "noise_multiplier": self.noise_multiplier if self.planned else None,
            "central": None,
            "clients": {},
            "ledger": PureEpsilonLedger().state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("noise_multiplier") is not None:  # the plan the run was charged with
            self.noise_multiplier = float(state["noise_multiplier"])
            self.planned = True


#: ``privacy.mechanism`` -> its server-side class (federated mode). Add a mechanism with
#: :func:`register_mechanism`; ``fedq.config.FED_PRIVACY`` lists the same names for config checks.
MECHANISMS: dict[str, type[ServerPrivacy]] = {"none": ServerPrivacy}

_P = TypeVar("_P", bound=type[ServerPrivacy])


def register_mechanism(cls: _P) -> _P:
    """Class decorator: make ``cls`` the server side of ``privacy.mechanism: <cls.name>``."""
    if cls.name in MECHANISMS:
        raise ValueError(f"privacy mechanism {cls.name!r} is already registered")
    MECHANISMS[cls.name] = cls
    return cls


def mechanism_class(name: str) -> type[ServerPrivacy]:
    """The class of ``privacy.mechanism: name`` (a client reads it from the resolved
    configuration it got at registration); an unknown name is no mechanism."""
    return MECHANISMS.get(name, ServerPrivacy)


def make_privacy(cfg: RunConfig) -> ServerPrivacy:
    """The server side of ``cfg.privacy.mechanism``."""
    cls = MECHANISMS.get(cfg.privacy.mechanism)
    if cls is None:
        raise ConfigError(
            f"privacy.mechanism: {cfg.privacy.mechanism!r} is not available in federated mode; "
            f"use one of {', '.join(MECHANISMS)}"
        )
    return cls(cfg)


@register_mechanism
class DpsgdPrivacy(ServerPrivacy):
    """``dpsgd``: local DP-SGD on every client; one Gaussian accountant per client, charged that
    client's local steps at its sample rate each round it is selected."""

    name = "dpsgd"
    enabled = True
    plans_noise = True
    per_client = True
    local_dpsgd = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.clients: dict[int, GaussianAccountant] = {}

    def _accountant(self) -> GaussianAccountant:
        return GaussianAccountant(self.p.accountant, self.p.delta)

    def _planned_noise(self, sizes: Mapping[int, int]) -> float:
        # the smallest client (largest q) spends its budget fastest
        p = self.p
        assert p.target_epsilon is not None
        steps, q = self._steps(min(sizes.values()))
        participations = math.ceil(self.cfg.rounds.count * self.sample_rate)
        return plan_noise_multiplier(
            p.target_epsilon, p.delta, q, participations * steps, p.accountant
        )

    def _plan_numbers(self, sizes: Mapping[int, int]) -> dict[str, Any]:
        p = self.p
        steps, q = self._steps(min(sizes.values()))
        parts = math.ceil(self.cfg.rounds.count * self.sample_rate)
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": q,
            "clip_norm": p.clip_norm,
            "expected_epsilon": expected_epsilon(
                self.noise_multiplier, q, parts * steps, p.delta, p.accountant
            ),
        }

    def _client_eps_if(self, cid: int, n: int) -> float:
        steps, q = self._steps(n)
        acc = self.clients.get(cid) or self._accountant()
        return acc.epsilon_if(self.noise_multiplier, q, steps)

    def charge(self, selected: Sequence[int], sizes: Mapping[int, int]) -> None:
        self._plan(sizes)
        for cid in selected:
            steps, q = self._steps(sizes[cid])
            self.clients.setdefault(cid, self._accountant()).step(self.noise_multiplier, q, steps)

    def epsilon(self) -> float | None:
        return max((a.epsilon() for a in self.clients.values()), default=0.0)

    def client_epsilon(self, cid: int) -> float:
        acc = self.clients.get(cid)
        return acc.epsilon() if acc is not None else 0.0

    def client_scalars(self) -> dict[str, float]:
        return {"dp_noise_multiplier": self.noise_multiplier, "dp_clip": self.p.clip_norm}

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["clients"] = {int(c): a.state_dict() for c, a in self.clients.items()}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.clients = {}
        for cid, s in state.get("clients", {}).items():
            acc = self._accountant()
            acc.load_state_dict(s)
            self.clients[int(cid)] = acc


@register_mechanism
class CentralPrivacy(ServerPrivacy):
    """``central``: client-level DP-FedAvg; one Gaussian accountant for the run, one step at the
    client sampling rate K/N per round; the server clips and noises the aggregate."""

    name = "central"
    enabled = True
    plans_noise = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.central = GaussianAccountant(self.p.accountant, self.p.delta)

    def _planned_noise(self, sizes: Mapping[int, int]) -> float:
        p = self.p
        assert p.target_epsilon is not None
        return plan_noise_multiplier(
            p.target_epsilon, p.delta, self.sample_rate, self.cfg.rounds.count, p.accountant
        )

    def _plan_numbers(self, sizes: Mapping[int, int]) -> dict[str, Any]:
        p = self.p
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "clip_norm": p.clip_norm,
            "expected_epsilon": expected_epsilon(
                self.noise_multiplier,
                self.sample_rate,
                self.cfg.rounds.count,
                p.delta,
                p.accountant,
            ),
        }

    def check_round(self, sizes: Mapping[int, int], k: int) -> None:
        self._plan(sizes)
        if self.guard is None:
            return
        projected = self.central.epsilon_if(self.noise_multiplier, self.sample_rate, 1)
        self.guard.check(projected, spent_epsilon=self.central.epsilon(), what="next round")

    def charge(self, selected: Sequence[int], sizes: Mapping[int, int]) -> None:
        self._plan(sizes)
        self.central.step(self.noise_multiplier, self.sample_rate, 1)

    def epsilon(self) -> float | None:
        return self.central.epsilon()

    def client_scalars(self) -> dict[str, float]:
        return {"dp_noise_multiplier": self.noise_multiplier, "dp_clip": self.p.clip_norm}

    @classmethod
    def privatize(
        cls,
        delta: Mapping[str, torch.Tensor],
        scalars: Mapping[str, float],
        generator: torch.Generator,
        *,
        laplace_sensitivity: float | None = None,
    ) -> tuple[dict[str, torch.Tensor], float]:
        """L2 clip (the noise is added once, to the aggregate, by the server)."""
        return clip_l2(delta, scalars["dp_clip"])

    def aggregate(
        self,
        updates: list[tuple[State, float]],
        generator: torch.Generator,
        combine: Callable[[list[tuple[State, float]]], State] = weighted_mean,
    ) -> State:
        """Re-clip every decoded update (quantization can move its norm), unweighted sum over
        the planned K clients, Gaussian noise std z*C/K. Its sensitivity argument needs that
        sum, so the config allows only the mean aggregator with it and ``combine`` is not
        used."""
        k = self.cfg.rounds.clients_per_round
        mech = GaussianMechanism(self.p.clip_norm, self.noise_multiplier)
        clipped = [clip_l2(d, self.p.clip_norm)[0] for d, _ in updates]
        total = {name: torch.stack([c[name] for c in clipped]).sum(0) / k for name in clipped[0]}
        noise = mech.noise(total, generator, scale_divisor=k)
        return {name: t + noise[name] for name, t in total.items()}

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["central"] = self.central.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("central") is not None:
            self.central.load_state_dict(state["central"])


@register_mechanism
class LaplacePrivacy(ServerPrivacy):
    """``laplace``: Laplace noise on each client update; a pure-epsilon ledger per client, charged
    ``target_epsilon / releases`` (:func:`laplace_participations`) per participation."""

    name = "laplace"
    enabled = True
    per_client = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.ledger = PureEpsilonLedger()
        assert self.p.target_epsilon is not None
        self.eps_per_release = self.p.target_epsilon / laplace_participations(cfg)

    def _plan_numbers(self, sizes: Mapping[int, int]) -> dict[str, Any]:
        return {
            "epsilon_per_release": self.eps_per_release,
            "clip_norm": self.p.clip_norm,
            "calibration": self.p.laplace_calibration,
            "releases_per_client": laplace_participations(self.cfg),
        }

    def _client_eps_if(self, cid: int, n: int) -> float:
        return self.ledger.epsilon_if(cid, self.eps_per_release)

    def charge(self, selected: Sequence[int], sizes: Mapping[int, int]) -> None:
        self._plan(sizes)
        for cid in selected:
            self.ledger.charge(cid, self.eps_per_release)

    def epsilon(self) -> float | None:
        return self.ledger.max_spent()

    def client_scalars(self) -> dict[str, float]:
        return {"dp_clip": self.p.clip_norm, "dp_epsilon_release": self.eps_per_release}

    @classmethod
    def smoothness_calibrated(cls, calibration: str) -> bool:
        return calibration == "paper"

    @classmethod
    def privatize(
        cls,
        delta: Mapping[str, torch.Tensor],
        scalars: Mapping[str, float],
        generator: torch.Generator,
        *,
        laplace_sensitivity: float | None = None,
    ) -> tuple[dict[str, torch.Tensor], float]:
        """- sound calibration: L1-clip the update to C, so any two updates differ by at most
          2C in L1; Laplace noise of scale 2C / eps_release makes each release eps_release-DP.
        - paper calibration (``laplace_sensitivity`` given): no update clipping (the paper clips
          each mini-batch gradient in L1 instead), scale = s / eps_release = s * T_L / eps with
          the paper's heuristic sensitivity s (docs/algorithms.md §2.3)."""
        from fedq.privacy import LaplaceMechanism

        eps = scalars["dp_epsilon_release"]
        if laplace_sensitivity is not None:
            norm = float(sum(t.abs().sum() for t in delta.values()))
            noised = LaplaceMechanism(laplace_sensitivity / eps).privatize(delta, generator)
            return noised, norm
        clip = scalars["dp_clip"]
        clipped, norm = clip_l1(delta, clip)
        return LaplaceMechanism(2.0 * clip / eps).privatize(clipped, generator), norm

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["ledger"] = self.ledger.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.ledger.load_state_dict(state.get("ledger", self.ledger.state_dict()))
