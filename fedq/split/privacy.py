"""Differential privacy of the activations a split client sends (``privacy.mechanism:
activations``).

Mechanism (client side, before quantization; the order clip -> noise -> quantize of
docs/algorithms.md §5.26): each example's cut activation ``h_i in R^{T x d}`` is clipped to L2 norm
``C`` (``privacy. clip_norm``) and gets ``N(0, (z C)^2)`` per coordinate, with
:class:`fedq.privacy.GaussianMechanism` (its ``privatize`` = :func:`fedq.privacy.clip_l2` + Gaussian
noise). The clip factor is a constant in the backward pass (as DP-SGD treats per-example clipping),
so the bottom still trains. The quantizer then codes the noisy tensor; quantization is
post-processing and costs no privacy.

Accounting (server side: the round engine's ledger), our assumptions stated honestly ([I], not
from a paper; docs/algorithms.md §4 notes that no public split framework privatizes activations):

- The protected unit is **one training example of one client** (record-level DP for that
  client's data set), and the protected release is the stream of activation messages.
- One split step releases the batch's noisy activations; an example's row has sensitivity ``C``
  under add/remove of that example, so a step is a Gaussian mechanism with multiplier ``z``.
- Batches are drawn by shuffling, but the RDP/PRV accountant assumes Poisson sampling at rate
  ``q = batch_size / |client data|`` (the same approximation Opacus users and the federated
  ``dpsgd`` path make). Each client has its own :class:`fedq.privacy.GaussianAccountant`,
  charged ``local_steps`` steps when it is selected for a round (at round open, before any
  release, so a client that fails later is still charged). The reported epsilon is the worst
  client's.
- **Not covered**: the labels (vanilla split learning sends them to the server in the clear),
  the gradients the server returns (a function of server-side data only: fine), and the client
  LoRA/gate state uploaded for FedAvg every round, which is a function of the client's data and is
  *not* noised. The guarantee is therefore about what the activations reveal of the inputs, not
  a full DP guarantee of the client's participation; combine with a DP FedAvg of the client state
  for that (not implemented for split mode).

Budget stop: with ``privacy.target_epsilon`` set, the server selects only clients whose next
round stays within it (``BudgetGuard``) and stops the run when fewer than a round needs remain.
With no ``noise_multiplier`` given, ``z`` is planned from the target over the worst client's
expected number of steps (``plan_noise_multiplier``) and sent to the clients with their tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedq.config import RunConfig
from fedq.errors import PrivacyBudgetExceeded
from fedq.privacy import BudgetGuard, GaussianAccountant, GaussianMechanism, plan_noise_multiplier
from fedq.rounds.workload import Ledger, NoPrivacy

MECHANISM = "activations"


def enabled(cfg: RunConfig) -> bool:
    return cfg.privacy.mechanism == MECHANISM


def sample_rate(cfg: RunConfig, client_size: int) -> float:
    """Poisson-approximation sample rate of one client's examples per step."""
    return min(1.0, cfg.train.batch_size / max(int(client_size), 1))


def planned_noise_multiplier(cfg: RunConfig, client_sizes: Sequence[int]) -> float:
    """``privacy.noise_multiplier``, or the smallest one that keeps the worst client (smallest
    data set, largest ``q``) within ``target_epsilon`` over its expected steps. Deterministic,
    so the driver and every worker derive the same value."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    assert p.target_epsilon is not None  # PrivacyConfig.check
    f = cfg.rounds
    participations = math.ceil(f.count * f.clients_per_round / f.num_clients)
    q = sample_rate(cfg, min(client_sizes))
    return plan_noise_multiplier(
        p.target_epsilon, p.delta, q, participations * cfg.split.local_steps, p.accountant
    )


def privatize_activations(
    h: torch.Tensor, mech: GaussianMechanism, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Clip every example (first axis) to L2 norm ``mech.clip_norm`` and add Gaussian noise of
    std ``mech.std``. Differentiable in ``h`` (constant clip factors). Returns the noisy tensor
    and the number of examples that were clipped."""
    rows, clipped = [], 0
    for i in range(h.shape[0]):
        row = {"h": h[i]}
        norm = float(h[i].detach().double().norm())
        clipped += int(norm > mech.clip_norm)
        rows.append(mech.privatize(row, generator)["h"])
    return torch.stack(rows).to(h.dtype), clipped


class ActivationLedger:
    """The server's per-client accountants and budget guard: the round engine's ledger in split
    mode (module docstring). The noise multiplier is planned once, from the client sizes known
    when the first round opens, and sent to the clients with every task."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        p = cfg.privacy
        self.noise_multiplier: float | None = (
            None if p.noise_multiplier is None else float(p.noise_multiplier)
        )
        self.guard = BudgetGuard(p.target_epsilon, p.delta) if p.target_epsilon else None
        self.accountants: dict[int, GaussianAccountant] = {}

    def _z(self, sizes: Mapping[int, int]) -> float:
        if self.noise_multiplier is None:
            self.noise_multiplier = planned_noise_multiplier(self.cfg, list(sizes.values()))
        return self.noise_multiplier

    def _acc(self, cid: int) -> GaussianAccountant:
        p = self.cfg.privacy
        return self.accountants.setdefault(cid, GaussianAccountant(p.accountant, p.delta))

    def _eps_if(self, cid: int, n: int, z: float) -> float:
        p = self.cfg.privacy
        acc = self.accountants.get(cid) or GaussianAccountant(p.accountant, p.delta)
        return acc.epsilon_if(z, sample_rate(self.cfg, n), self.cfg.split.local_steps)

    def eligible(self, candidates: Sequence[int], sizes: Mapping[int, int]) -> list[int]:
        if self.guard is None:
            return list(candidates)
        z = self._z(sizes)
        return [c for c in candidates if self.guard.allows(self._eps_if(c, sizes[c], z))]

    def check_round(self, sizes: Mapping[int, int], k: int) -> None:
        self._z(sizes)
        if self.guard is not None:
            self.guard.check_clients(len(self.eligible(sorted(sizes), sizes)), k, self.epsilon())

    def charge(self, selected: Sequence[int], sizes: Mapping[int, int]) -> None:
        """One round (``local_steps`` steps) for each selected client, before any release."""
        z = self._z(sizes)
        for cid in selected:
            self._acc(cid).step(z, sample_rate(self.cfg, sizes[cid]), self.cfg.split.local_steps)

    def epsilon(self) -> float:
        """Worst client's epsilon so far."""
        return max((a.epsilon() for a in self.accountants.values()), default=0.0)

    def client_scalars(self) -> dict[str, float]:
        z, clip = self.noise_multiplier, self.cfg.privacy.clip_norm
        return {} if z is None else {"dp_noise_multiplier": z, "dp_clip": clip}

    def plan(self, sizes: Mapping[int, int]) -> dict[str, Any]:
        p = self.cfg.privacy
        q_max = max(sample_rate(self.cfg, n) for n in sizes.values())
        return {
            "mechanism": MECHANISM,
            "noise_multiplier": self._z(sizes),
            "clip_norm": p.clip_norm,
            "delta": p.delta,
            "target_epsilon": p.target_epsilon,
            "sample_rate_max": q_max,
        }

    def state_dict(self) -> dict[str, Any]:
        accountants = {c: a.state_dict() for c, a in self.accountants.items()}
        return {"noise_multiplier": self.noise_multiplier, "accountants": accountants}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("noise_multiplier") is not None:
            self.noise_multiplier = float(state["noise_multiplier"])
        self.accountants = {}
        for cid, st in dict(state.get("accountants", {})).items():
            self._acc(int(cid)).load_state_dict(st)


#: ``privacy.mechanism`` -> the split server's ledger for it (``fedq.config.SPLIT_PRIVACY`` lists
#: the same names). Split mode cannot share federated mode's registry (``fedq.fed.privacy``; the two
#: modes do not import each other); both ledgers are the round engine's
#: :class:`~fedq.rounds.workload.Ledger`.
LEDGERS: dict[str, Callable[[RunConfig], Ledger]] = {
    "none": lambda cfg: NoPrivacy(),
    MECHANISM: ActivationLedger,
}


def make_ledger(cfg: RunConfig) -> Ledger:
    """The split server's ledger for ``cfg.privacy.mechanism`` (checked by the config)."""
    return LEDGERS[cfg.privacy.mechanism](cfg)


__all__ = [
    "LEDGERS",
    "MECHANISM",
    "ActivationLedger",
    "PrivacyBudgetExceeded",
    "enabled",
    "make_ledger",
    "planned_noise_multiplier",
    "privatize_activations",
    "sample_rate",
]
