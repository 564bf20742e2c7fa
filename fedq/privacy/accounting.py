"""Privacy accounting: Opacus accountants for the Gaussian mechanism, a pure-epsilon ledger for
Laplace, and a budget guard that stops training *before* a release would exceed the target.

The RDP (Mironov 2017, arXiv:1702.07476; Mironov, Talwar & Zhang 2019, arXiv:1908.10530) and PRV
(Gopi, Lee & Wutschitz 2021, arXiv:2106.02848) maths are Opacus's; this module only keeps the
history, answers "what if" questions on a copy, and checkpoints. ``opacus`` is imported lazily.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

from fedq.errors import ConfigError, FedqError, PrivacyBudgetExceeded

AccountantKind = Literal["rdp", "prv"]
ACCOUNTANT_KINDS: tuple[str, ...] = ("rdp", "prv")


class PrivacyStateError(FedqError, ValueError):
    """A checkpointed accountant / ledger state does not fit the object it is loaded into."""


def _check_kind(kind: str) -> str:
    if kind not in ACCOUNTANT_KINDS:
        raise ConfigError(
            f"accountant: unknown kind {kind!r}; allowed: {', '.join(ACCOUNTANT_KINDS)}"
        )
    return kind


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0 < d < 1:
        raise ConfigError(f"delta: must be in (0, 1), got {delta!r}")
    return d


def _check_step(
    noise_multiplier: float, sample_rate: float, steps: int
) -> tuple[float, float, int]:
    z, q = float(noise_multiplier), float(sample_rate)
    problems = []
    if not (math.isfinite(z) and z > 0):
        problems.append(f"noise_multiplier: must be finite and > 0, got {noise_multiplier!r}")
    if not 0 < q <= 1:
        problems.append(f"sample_rate: must be in (0, 1], got {sample_rate!r}")
    if int(steps) != steps or steps < 0:
        problems.append(f"steps: must be an integer >= 0, got {steps!r}")
    if problems:
        raise ConfigError(problems)
    return z, q, int(steps)


def _make(kind: str) -> Any:
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=kind)


class GaussianAccountant:
    """(epsilon, delta) of composed Poisson-subsampled Gaussian mechanisms, via Opacus.

    One ``step(z, q, steps)`` is ``steps`` releases, each adding ``N(0, (z*C)^2)`` noise to a sum of
    contributions clipped to L2 norm ``C``, where each protected unit (an example for DP-SGD, a
    client for central DP-FedAvg) takes part independently with probability ``q``. The history is
    Opacus's own list of ``(noise_multiplier, sample_rate, steps)`` runs, so :meth:`epsilon` is
    exactly what an Opacus accountant of the same kind reports.
    """

    def __init__(self, kind: AccountantKind = "rdp", delta: float = 1e-5) -> None:
        self.kind = _check_kind(kind)
        self.delta = _check_delta(delta)
        self._acc = _make(self.kind)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Runs of identical steps, oldest first (a copy)."""
        return [(float(z), float(q), int(n)) for z, q, n in self._acc.history]

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self._acc.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` releases at ``(noise_multiplier, sample_rate)``.

        Consecutive identical steps are merged into one run, as Opacus's own ``step`` does.
        """
        z, q, n = _check_step(noise_multiplier, sample_rate, steps)
        if n == 0:
            return
        hist = self._acc.history
        if hist and hist[-1][0] == z and hist[-1][1] == q:
            hist[-1] = (z, q, int(hist[-1][2]) + n)
        else:
            hist.append((z, q, n))

    def epsilon(self) -> float:
        """Epsilon spent so far at the configured delta (0 before any step)."""
        if not self._acc.history:
            return 0.0
        return float(self._acc.get_epsilon(delta=self.delta))

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Epsilon after ``steps`` more releases, computed on a copy (this one is unchanged)."""
        trial = copy.deepcopy(self)
        trial.step(noise_multiplier, sample_rate, steps)
        return trial.epsilon()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: kind, delta and the history as lists ``[z, q, steps]``."""
        return {
            "kind": self.kind,
            "delta": self.delta,
            "history": [[float(z), float(q), int(n)] for z, q, n in self._acc.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (kind must match; delta is restored from the state)."""
        try:
            kind, delta, hist = state["kind"], state["delta"], state["history"]
        except (KeyError, TypeError) as e:
            raise PrivacyStateError(f"accountant state lacks {e}") from None
        if kind != self.kind:
            raise PrivacyStateError(
                f"accountant state is {kind!r}, this accountant is {self.kind!r}"
            )
        runs = []
        for i, h in enumerate(hist):
            try:
                z, q, n = _check_step(h[0], h[1], h[2])
            except (ConfigError, IndexError, TypeError) as e:
                raise PrivacyStateError(f"accountant state: bad history entry {i}: {e}") from None
            runs.append((z, q, n))
        self.delta = _check_delta(delta)
        self._acc.history = runs

    def __repr__(self) -> str:
        return f"GaussianAccountant(kind={self.kind!r}, delta={self.delta}, steps={self.steps})"


class PureEpsilonLedger:
    """Pure (epsilon, 0)-DP spent per client under basic sequential composition.

    Each Laplace release by a client is charged with its own epsilon; a client's total is the sum
    (Dwork & Roth 2014, Thm 3.14). The run's guarantee is the worst client's total,
    :meth:`max_spent`, since clients' data sets are disjoint (parallel composition).
    """

    def __init__(self) -> None:
        self._spent: dict[int | str, float] = {}

    @staticmethod
    def _eps(epsilon: float) -> float:
        e = float(epsilon)
        if not (math.isfinite(e) and e >= 0):
            raise ConfigError(f"epsilon: must be finite and >= 0, got {epsilon!r}")
        return e

    def charge(self, client_id: int | str, epsilon: float) -> float:
        """Add one release of ``epsilon`` to ``client_id``; returns that client's new total."""
        self._spent[client_id] = self._spent.get(client_id, 0.0) + self._eps(epsilon)
        return self._spent[client_id]

    def spent(self, client_id: int | str) -> float:
        return self._spent.get(client_id, 0.0)

    def max_spent(self) -> float:
        return max(self._spent.values(), default=0.0)

    def epsilon_if(self, client_id: int | str, epsilon: float) -> float:
        """What ``client_id`` would have spent after one more release (nothing is charged)."""
        return self.spent(client_id) + self._eps(epsilon)

    def state_dict(self) -> dict[str, Any]:
        """``{"spent": [[client_id, epsilon], ...]}`` (pairs keep int vs str ids through JSON)."""
        return {"spent": [[cid, eps] for cid, eps in self._spent.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            pairs = [(cid, self._eps(eps)) for cid, eps in state["spent"]]
        except (KeyError, TypeError, ValueError) as e:
            raise PrivacyStateError(f"ledger state is malformed: {e}") from None
        self._spent = dict(pairs)

    def __repr__(self) -> str:
        return f"PureEpsilonLedger(clients={len(self._spent)}, max_spent={self.max_spent():.4g})"


class BudgetGuard:
    """Refuse a release whose projected epsilon exceeds ``target_epsilon`` (at ``delta``).

    The loop asks the accountant for the epsilon *after* the next round or step
    (``epsilon_if``) and calls :meth:`check` before doing it, so training stops with the budget
    intact rather than one step over it.
    """

    def __init__(self, target_epsilon: float, delta: float = 0.0) -> None:
        t = float(target_epsilon)
        if not (math.isfinite(t) and t > 0):
            raise ConfigError(f"target_epsilon: must be finite and > 0, got {target_epsilon!r}")
        d = float(delta)
        if not 0 <= d < 1:
            raise ConfigError(f"delta: must be in [0, 1), got {delta!r}")
        self.target_epsilon = t
        self.delta = d

    def allows(self, projected_epsilon: float) -> bool:
        return float(projected_epsilon) <= self.target_epsilon

    def check(
        self,
        projected_epsilon: float,
        *,
        spent_epsilon: float | None = None,
        what: str = "next release",
    ) -> None:
        """Raise :class:`~fedq.errors.PrivacyBudgetExceeded` if ``projected_epsilon > target``."""
        if self.allows(projected_epsilon) and not math.isnan(projected_epsilon):
            return
        spent = "unknown" if spent_epsilon is None else f"{spent_epsilon:.4f}"
        raise PrivacyBudgetExceeded(
            f"privacy budget: the {what} would bring epsilon to {projected_epsilon:.4f} "
            f"(spent so far {spent}), over the target {self.target_epsilon:.4f} at delta "
            f"{self.delta:g}; stopping before it"
        )

    def check_clients(self, eligible: int, needed: int, spent_epsilon: float | None) -> None:
        """For per-client budgets: raise :class:`~fedq.errors.PrivacyBudgetExceeded` if fewer
        than ``needed`` clients can take part again within the target (``eligible`` can);
        ``spent_epsilon`` is the most any client has spent."""
        if eligible >= needed:
            return
        spent = "unknown" if spent_epsilon is None else f"{spent_epsilon:.4g}"
        raise PrivacyBudgetExceeded(
            f"privacy budget: only {eligible} clients can take part again without exceeding "
            f"epsilon={self.target_epsilon} (a round needs {needed}); spent so far: max {spent}"
        )

    def __repr__(self) -> str:
        return f"BudgetGuard(target_epsilon={self.target_epsilon}, delta={self.delta})"


def plan_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    kind: AccountantKind = "rdp",
    *,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) reaching ``target_epsilon`` after
    ``steps`` releases at ``sample_rate`` (Opacus ``get_noise_multiplier``; result's epsilon is
    in ``[target - tolerance, target]``)."""
    from opacus.accountants.utils import get_noise_multiplier

    _check_kind(kind)
    _check_step(1.0, sample_rate, steps)
    if steps < 1:
        raise ConfigError(f"steps: must be >= 1 to plan noise, got {steps}")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=float(target_epsilon),
                target_delta=_check_delta(delta),
                sample_rate=float(sample_rate),
                steps=int(steps),
                accountant=kind,
                epsilon_tolerance=epsilon_tolerance,
            )
        )
    except ValueError as e:
        raise ConfigError(
            f"target_epsilon {target_epsilon} at delta {delta} is unreachable with sample rate "
            f"{sample_rate} over {steps} steps: {e}"
        ) from None


def expected_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    kind: AccountantKind = "rdp",
) -> float:
    """Epsilon after ``steps`` releases at ``(noise_multiplier, sample_rate)`` from scratch."""
    acc = GaussianAccountant(kind, delta)
    acc.step(noise_multiplier, sample_rate, steps)
    return acc.epsilon()
