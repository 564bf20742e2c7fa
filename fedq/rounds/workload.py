"""What a mode plugs into the round engine: the server's workload, its privacy ledger, and the
hooks through which a run is observed.

The engine owns everything the two modes share (registration, liveness, selection, privacy
charging, deadlines, all-or-nothing rounds, checkpoints of its own state); a workload owns what a
round *is* in its mode: the task a selected client downloads, what an accepted update holds, what
closing a round does with them, and any exchange in between (:class:`ExchangeWorkload`, run in
the order a :class:`RoundPolicy` asks for: split mode's steps).

How a run ends is a :class:`RunOutcome`, typed: what kind of end, and the reason in words.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fedq.wire.message import WireMessage


@dataclass(frozen=True, slots=True)
class Member:
    """A registered client as the workload sees it."""

    client_id: str
    index: int  # position in the server's roster (seeds, selection)
    num_examples: int


@dataclass(frozen=True, slots=True)
class Update:
    """One accepted update, decoded and validated: ``tensors`` weighted by ``weight``."""

    member: Member
    tensors: Mapping[str, Any]
    weight: float
    scalars: Mapping[str, float]
    nbytes: int = 0


class Ledger(Protocol):
    """Privacy accounting the engine charges when a round opens (every selected client, before any
    release) and consults before selecting. ``sizes`` maps roster index to local examples."""

    def check_round(self, sizes: Mapping[int, int], k: int) -> None:
        """Raise :class:`~fedq.errors.PrivacyBudgetExceeded` if no round can run any more."""

    def eligible(self, candidates: Sequence[int], sizes: Mapping[int, int]) -> list[int]:
        """The candidates whose next participation stays within the budget."""

    def charge(self, selected: Sequence[int], sizes: Mapping[int, int]) -> None: ...

    def epsilon(self) -> float | None: ...

    def plan(self, sizes: Mapping[int, int]) -> dict[str, Any]:
        """The derived numbers printed before training (noise multiplier, rates, ...)."""

    def client_scalars(self) -> dict[str, float]:
        """What clients need to run their side of the mechanism (sent with every task)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class NoPrivacy:
    """The ledger of a run without differential privacy."""

    def check_round(self, sizes: Mapping[int, int], k: int) -> None:
        return None

    def eligible(self, candidates: Sequence[int], sizes: Mapping[int, int]) -> list[int]:
        return list(candidates)

    def charge(self, selected: Sequence[int], sizes: Mapping[int, int]) -> None:
        return None

    def epsilon(self) -> float | None:
        return None

    def plan(self, sizes: Mapping[int, int]) -> dict[str, Any]:
        return {"mechanism": "none"}

    def client_scalars(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


class Workload(Protocol):
    """The mode-specific half of the server (federated: :class:`fedq.fed.server.FedServer`;
    split: :class:`fedq.split.protocol.SplitServer`). Called from the engine's thread
    (``open_round`` / ``close_round``) and from transport threads (``task`` / ``accept``)."""

    @property
    def ledger(self) -> Ledger:
        """The run's privacy ledger (the engine charges it as each round opens)."""
        ...

    def info(self) -> dict[str, Any]:
        """Facts for the start-up line (trainable parameters, ...)."""

    def open_round(self, r: int, selected: Sequence[Member]) -> None:
        """Prepare round ``r``'s tasks for ``selected`` (privacy is already charged)."""

    def task(self, r: int, member: Member) -> WireMessage:
        """The task message ``member`` downloads (it was selected in the open round ``r``)."""

    def accept(self, r: int, member: Member, msg: WireMessage) -> Update:
        """Validate and decode ``member``'s upload; raise FedqError (nothing kept) if bad."""

    def close_round(self, r: int, updates: Sequence[Update], apply: bool) -> dict[str, Any]:
        """Apply the round's updates (roster order) if ``apply``, else keep everything as it was;
        evaluate when due; return the round's metrics."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class TakeTurns:
    """An in-round exchange in turns: every selected member makes ``steps`` exchanges with the
    server per round (each a request answered at once), and the members take their turns one at
    a time in roster order, each all its steps. Whatever the timing, the workload sees the same
    sequence of exchanges, so the run is reproducible; a member's upload is accepted only after
    its last step."""

    steps: int


@dataclass(frozen=True, slots=True)
class RoundPolicy:
    """What a mode asks of the round engine beyond the shared loop: ``turns``, an in-round
    exchange (the workload must then be an :class:`ExchangeWorkload`; None: tasks and uploads
    only), and ``max_bad_updates``, after how many rounds with a refused update a client is
    excluded from the run (0: never)."""

    turns: TakeTurns | None = None
    max_bad_updates: int = 0


@runtime_checkable
class ExchangeWorkload(Protocol):
    """A workload with exchanges inside a round (split learning's steps): the engine checks each
    exchange's client and orders them as the run's :class:`RoundPolicy` says before calling
    ``exchange``."""

    def exchange(self, r: int, member: Member, msg: WireMessage) -> WireMessage: ...


@runtime_checkable
class RollbackWorkload(Protocol):
    """A workload whose state changes while a round is open (split steps train the server's
    half): when the run stops with a round open, the engine calls ``abandon_round`` so the
    workload puts back what that round changed (a resume runs it again from the checkpoint).
    A discarded round is rolled back by ``close_round(..., apply=False)`` itself."""

    def abandon_round(self, r: int) -> None: ...


class Hooks(Protocol):
    """How a run is observed: called from the engine's thread."""

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_open(self, r: int, ledger: dict[str, Any]) -> None:
        """Round ``r``'s privacy is charged (``ledger``: the ledger's state now); nothing is
        released before this returns (the run journals the ledger here)."""

    def on_round(self, record: dict[str, Any]) -> None:
        """A round closed; the next one opens when this returns (a simulation driver checkpoints
        its clients here)."""

    def on_done(self, outcome: RunOutcome) -> None: ...


class Ending(enum.Enum):
    """How a run ended."""

    COMPLETED = "completed"  # every round of the schedule ran
    STOPPED = "stopped"  # whoever runs the server stopped it (an operator, a driver)
    BUDGET = "budget"  # the privacy budget allows no further round
    TOO_FEW_CLIENTS = "too_few_clients"  # too few clients are left (excluded) for a round
    FAILED = "failed"  # the server failed


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """The end of a run: its :class:`Ending` and the reason in words (what clients are told, and
    what ``summary.json`` says as ``stopped_reason`` unless the run completed)."""

    ending: Ending
    reason: str

    @property
    def completed(self) -> bool:
        return self.ending is Ending.COMPLETED

    @property
    def stopped_reason(self) -> str | None:
        """The reason, unless the run completed."""
        return None if self.completed else self.reason
