"""The server's round loop, shared by every mode, simulation and deployment.

:class:`RoundEngine` is the transport's handler (``Register``, ``Work``, ``GetTask``,
``PushUpdate``, and the in-round exchange the ``Step`` RPC carries) and runs the loop in its own
thread:

1. wait until ``rounds.min_clients`` registered clients are *available* (their principal's work
   stream is open);
2. stop if the privacy budget allows no further round; else select ``clients_per_round`` of the
   available clients that stay within the budget (:func:`~fedq.rounds.roster.select_clients`) and
   charge their privacy before anything is released;
3. publish the tasks (each principal's work stream gets a TASK item for its selected clients);
4. collect uploads until every selected client delivered or was dropped (its work stream broke,
   a step failed) or the deadline ``rounds.timeout_s`` passed;
5. close the round all or nothing: applied only with at least ``rounds.min_clients`` updates; an
   update arriving later is refused and never counted. A discarded round leaves the model as it
   was when the round opened (a workload whose exchanges trained something rolls that back);
   the privacy charged when it opened stays spent.

An update the workload refuses (malformed, non-finite, beyond the defence bounds) is a *bad
update*: counted per client in the round's record, and a client with bad updates in
the mode's :attr:`RoundPolicy.max_bad_updates` rounds is excluded from the run (never selected
again, kept in the checkpoint). The workload combines the accepted updates in roster order, so the
result never depends on when each arrived.

A mode may ask for an in-round exchange (:class:`~fedq.rounds.workload.TakeTurns`, split mode's
steps): the exchanges run in one fixed order, the selected clients taking their turns in roster
order, each all its steps of the round (SFL-V2's "clients take turns"; a process hosting several
clients runs them in that order anyway). Whatever the timing, the workload sees the same
sequence, so such runs are reproducible, and a client that vanishes mid-turn leaves the workload
as it was after its last whole step while the next client takes over.

The run ends with a :class:`~fedq.rounds.workload.RunOutcome` (completed, stopped, out of privacy
budget, too few clients, failed), handed to the hooks and kept as :attr:`RoundEngine.outcome`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedq import __version__
from fedq.codec.packed import FORMAT_VERSION
from fedq.config import RunConfig
from fedq.errors import AlreadyConnected, FedqError, PrivacyBudgetExceeded
from fedq.rounds.roster import select_clients
from fedq.rounds.workload import (
    Ending,
    ExchangeWorkload,
    Hooks,
    Member,
    RollbackWorkload,
    RoundPolicy,
    RunOutcome,
    Update,
    Workload,
)
from fedq.wire.control import PROTOCOL_VERSION, Assignment, Joined, Registration, WorkItem
from fedq.wire.message import MessageKind, WireMessage

log = logging.getLogger(__name__)

#: How often a waiting thread re-checks what it waits for (stop, deadline, a closed stream).
_TICK = 0.5


@dataclass
class _Turns:
    """The ordered turns of the open round (a policy's :class:`TakeTurns`): each selected member
    makes ``steps`` exchanges, one member at a time in roster order (module docstring)."""

    steps: int
    made: dict[str, int] = field(default_factory=dict)  # exchanges made per client
    busy: set[str] = field(default_factory=set)  # clients with an exchange in progress

    def next_of(self, member: Member, msg: WireMessage) -> int:
        """How many exchanges ``member`` has made, when ``msg`` is its next one; a FedqError
        when it is not (all made, out of order, or the same one already in progress)."""
        cid, spr = member.client_id, self.steps
        done = self.made.get(cid, 0)
        if done >= spr:
            raise FedqError(
                f"{cid} has taken all {spr} steps of round "
                f"{msg.round}: step {msg.step} is not one of them"
            )
        if msg.step - msg.round * spr != done:
            raise FedqError(
                f"{cid}: step {msg.step} out of order (expected step "
                f"{msg.round * spr + done} of round {msg.round})"
            )
        if cid in self.busy:  # the same step sent twice at once
            raise FedqError(f"{cid}: step {msg.step} is already in progress")
        return done

    def finished(self, client_id: str) -> bool:
        return self.made.get(client_id, 0) >= self.steps

    def waiting_for(self, member: Member, active: Sequence[Member]) -> list[Member]:
        """The active members before ``member`` whose turns are not over."""
        return [m for m in active if m.index < member.index and not self.finished(m.client_id)]


@dataclass
class _Open:
    """The open round."""

    index: int
    selected: list[Member]
    deadline: float  # time.monotonic() after which undelivered clients are dropped
    opened: float
    updates: dict[str, Update] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    refused: dict[str, dict[str, Any]] = field(default_factory=dict)  # bad updates: count, reason
    excluded: list[str] = field(default_factory=list)  # clients excluded during this round
    turns: _Turns | None = None  # the round's ordered exchanges, when the policy asks for them

    def member(self, client_id: str) -> Member | None:
        return next((m for m in self.selected if m.client_id == client_id), None)

    def active(self) -> list[Member]:
        return [
            m
            for m in self.selected
            if m.client_id not in self.updates and m.client_id not in self.dropped
        ]

    def complete(self) -> bool:
        return not self.active()


class RoundEngine:
    """Registration, liveness, selection, privacy charging, deadlines and all-or-nothing rounds
    (module docstring). ``roster`` is every client id the run knows, in order: its position is
    each client's index (seeds, selection). ``policy``: what the mode asks of the loop (an
    in-round exchange, when to exclude a client); by default neither."""

    def __init__(
        self,
        cfg: RunConfig,
        workload: Workload,
        roster: Sequence[str],
        *,
        run_id: str,
        config_json: str,
        num_classes: int,
        input_dim: int,
        hooks: Hooks | None = None,
        policy: RoundPolicy | None = None,
    ) -> None:
        if len(set(roster)) != len(roster) or not roster:
            raise FedqError("the roster must list distinct client ids")
        self.policy = policy or RoundPolicy()
        if self.policy.turns is not None and not isinstance(workload, ExchangeWorkload):
            raise FedqError("a policy with turns needs a workload with an exchange method")
        self.cfg = cfg
        self.workload = workload
        self.roster = list(roster)
        self.index = {cid: i for i, cid in enumerate(self.roster)}
        self.run_id = run_id
        self.hooks = hooks
        self._config_json = config_json
        self._num_classes, self._input_dim = int(num_classes), int(input_dim)
        self._cv = threading.Condition()
        self._members: dict[str, Member] = {}
        self._owner: dict[str, str] = {}  # client id -> principal hosting it
        self._declared: dict[str, int] = {}  # client id -> examples it declared first
        self._told: set[str] = set()  # principals whose work stream delivered DONE
        self._streams: dict[str, int] = {}  # principal -> open work streams
        self._round: _Open | None = None
        self._waiting = "starting"
        self._current = 0
        self.next_round = 0
        self._done: RunOutcome | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._strikes: dict[str, int] = {}  # client id -> rounds with a refused update
        self.excluded: dict[str, str] = {}  # client id -> why it takes no further part

    # ------------------------------------------------------------------ registration and liveness
    def register(self, principal: str, reg: Registration) -> Joined:
        if reg.protocol_version != PROTOCOL_VERSION:
            raise FedqError(
                f"this server speaks round protocol {PROTOCOL_VERSION} (fedq {__version__}); "
                f"the client speaks {reg.protocol_version} (fedq {reg.fedq_version or '?'}): "
                "install the same fedq release on both sides"
            )
        if reg.wire_format_version != FORMAT_VERSION:
            raise FedqError(
                f"this server reads wire format {FORMAT_VERSION} (fedq {__version__}); the client "
                f"writes {reg.wire_format_version} (fedq {reg.fedq_version or '?'}): install the "
                "same fedq release on both sides"
            )
        unknown = [c.client_id for c in reg.clients if c.client_id not in self.index]
        if unknown:
            raise FedqError(f"unknown client ids {unknown[:3]}: not in this run's roster")
        with self._cv:
            for c in reg.clients:
                self._check_holder(c.client_id, c.num_examples)
            for c in reg.clients:
                self._members[c.client_id] = Member(
                    c.client_id, self.index[c.client_id], c.num_examples
                )
                self._declared[c.client_id] = c.num_examples
                self._owner[c.client_id] = principal
            self._cv.notify_all()
        log.info("%s registered %d client(s) from %s", principal, len(reg.clients), reg.node or "?")
        return Joined(
            run_id=self.run_id,
            config_json=self._config_json,
            client_index={c.client_id: self.index[c.client_id] for c in reg.clients},
            num_classes=self._num_classes,
            input_dim=self._input_dim,
            fedq_version=__version__,
        )

    def _check_holder(self, client_id: str, num_examples: int) -> None:
        """One holder per client id, and one example count per client and run (caller holds the
        lock). While the work stream of the process holding ``client_id`` is open, registering
        it again is refused (AlreadyConnected), from another process or the same principal: a
        site that lost its network comes back once the server has seen its old stream close
        (at once when the connection resets; a silent one by the keepalive timeout). The count
        a client declared first weights its updates for the whole run (the checkpoint keeps
        it): a different one is refused."""
        owner = self._owner.get(client_id)
        if owner is not None and self._streams.get(owner, 0):
            raise AlreadyConnected(
                f"{client_id} is already connected from another process (its work stream is "
                "open): one process per client id. If that process is gone, the server lets "
                "this one in once it has seen its connection close (keepalive timeout)"
            )
        declared = self._declared.get(client_id)
        if declared is not None and declared != num_examples:
            raise FedqError(
                f"{client_id} declared {declared} examples when it first registered in run "
                f"{self.run_id}; it now declares {num_examples}. The count weights its updates "
                "and is fixed for the run: join again with the same data"
            )

    def work(
        self, principal: str, run_id: str, closed: threading.Event
    ) -> Generator[WorkItem, None, None]:
        """The principal's work items, each sent when it changes (module docstring)."""
        if run_id != self.run_id:
            raise FedqError(f"run {run_id[:40]!r} is not this server's run: register again")
        with self._cv:
            if not any(p == principal for p in self._owner.values()):
                raise FedqError(f"{principal} has not registered with run {self.run_id}")
            if self._streams.get(principal, 0):
                raise AlreadyConnected(f"{principal} already has its work stream open")
            self._streams[principal] = self._streams.get(principal, 0) + 1
            self._cv.notify_all()
        last: tuple[Any, ...] | None = None
        try:
            while not closed.is_set():
                with self._cv:
                    item, key = self._item_for(principal)
                    if key == last:
                        self._cv.wait(_TICK)
                        continue
                last = key
                yield item
                if item.action == "done":
                    with self._cv:
                        self._told.add(principal)
                    return
        finally:
            with self._cv:
                self._streams[principal] -= 1
                if not self._streams[principal]:
                    self._lost(principal, "its work stream closed")
                self._cv.notify_all()

    def untold(self) -> list[str]:
        """The registered principals whose work stream has not delivered DONE (once the run is
        over: those still to be told, e.g. a site reconnecting after a network failure)."""
        with self._cv:
            return sorted(p for p in set(self._owner.values()) if p not in self._told)

    def wake(self) -> None:
        """Wake every thread waiting on the engine (a work stream's ``closed`` was just set)."""
        with self._cv:
            self._cv.notify_all()

    def _item_for(self, principal: str) -> tuple[WorkItem, tuple[Any, ...]]:
        if self._done is not None:
            return WorkItem("done", self._current, reason=self._done.reason), ("done",)
        rnd = self._round
        if rnd is None:
            return (
                WorkItem("wait", self._current, reason=self._waiting),
                ("wait", self._current, self._waiting),
            )
        mine = [m for m in rnd.active() if self._owner.get(m.client_id) == principal]
        if mine:  # sent once per round and stream: delivering a task does not re-send the rest
            left = max(0.0, rnd.deadline - time.monotonic())
            tasks = tuple(Assignment(m.client_id, rnd.index, left) for m in mine)
            return WorkItem("task", rnd.index, tasks), ("task", rnd.index)
        reason = f"round {rnd.index} is open; no task for this process"
        return WorkItem("wait", rnd.index, reason=reason), ("task", rnd.index)

    def _lost(self, principal: str, why: str) -> None:
        """``principal``'s clients are no longer available; drop them from the open round."""
        rnd = self._round
        if rnd is None:
            return
        for m in rnd.active():
            if self._owner.get(m.client_id) == principal:
                rnd.dropped[m.client_id] = why
                log.warning("round %d: %s dropped (%s)", rnd.index, m.client_id, why)

    def available(self) -> list[Member]:
        """Registered clients whose principal has a work stream open, in roster order."""
        with self._cv:
            return self._available()

    def _available(self) -> list[Member]:
        alive = [
            m
            for cid, m in self._members.items()
            if self._streams.get(self._owner[cid], 0) and cid not in self.excluded
        ]
        return sorted(alive, key=lambda m: m.index)

    def wait_available(self, n: int, timeout: float) -> int:
        """Block until ``n`` clients are available (or ``timeout``); returns how many are."""
        end = time.monotonic() + timeout
        with self._cv:
            while len(self._available()) < n and time.monotonic() < end:
                self._cv.wait(min(_TICK, max(end - time.monotonic(), 0.0)))
            return len(self._available())

    # ------------------------------------------------------------------ tasks, updates, steps
    def _selected(self, client_id: str, r: int) -> tuple[_Open, Member]:
        """The open round and ``client_id``'s membership in it (caller holds the lock)."""
        rnd = self._round
        if rnd is None or rnd.index != r:
            current = None if rnd is None else rnd.index
            raise FedqError(f"round {r} is not open (open round: {current})")
        member = rnd.member(client_id)
        if member is None:
            raise FedqError(f"{client_id} is not selected in round {r}")
        if client_id in rnd.dropped:
            raise FedqError(f"{client_id} was dropped from round {r}: {rnd.dropped[client_id]}")
        if client_id in rnd.updates:
            raise FedqError(f"{client_id} already delivered its update for round {r}")
        return rnd, member

    def get_task(self, client_id: str, round: int) -> WireMessage:
        with self._cv:
            _, member = self._selected(client_id, round)
        return self.workload.task(round, member)

    def push_update(self, msg: WireMessage) -> None:
        """Validate and keep one client's upload for the open round; FedqError (nothing kept)
        if it is late, duplicate, unassigned or malformed. A ``failed`` message instead says
        the client cannot finish its task (its tag ``error`` says why): it is dropped from the
        round at once rather than at the deadline."""
        if msg.kind == MessageKind.FAILED:
            return self._failed(msg)
        if msg.kind != MessageKind.UPDATE:
            raise FedqError(f"expected an 'update' or 'failed' message, got {str(msg.kind)!r}")
        with self._cv:
            rnd, member = self._selected(msg.client_id, msg.round)
            turns = rnd.turns
            if turns is not None and not turns.finished(member.client_id):
                done = turns.made.get(member.client_id, 0)
                raise FedqError(f"{member.client_id} uploaded after {done} of {turns.steps} steps")
        try:
            update = self.workload.accept(msg.round, member, msg)
        except FedqError as e:
            self._bad_update(msg.round, member.client_id, str(e))
            raise
        with self._cv:
            rnd, member = self._selected(msg.client_id, msg.round)  # still open, still in it
            rnd.updates[member.client_id] = update
            self._cv.notify_all()

    def _bad_update(self, r: int, client_id: str, why: str) -> None:
        """Count a refused update; exclude its client once it has sent bad updates in
        ``defence.max_bad_updates`` rounds (the refused client may still send a good update in
        this round until then). With ``policy.max_bad_updates`` 0 refusals are counted, and no
        client is ever excluded."""
        limit = self.policy.max_bad_updates
        with self._cv:
            rnd = self._round
            if rnd is None or rnd.index != r:
                return
            entry = rnd.refused.setdefault(client_id, {"count": 0, "reason": ""})
            entry["count"] += 1
            entry["reason"] = why[:300]
            if entry["count"] == 1:
                self._strikes[client_id] = self._strikes.get(client_id, 0) + 1
            strikes = self._strikes[client_id]
            log.warning(
                "round %d: update from %s refused (%d round(s) with bad updates): %s",
                r,
                client_id,
                strikes,
                why,
            )
            if limit and strikes >= limit and client_id not in self.excluded:
                self.excluded[client_id] = (
                    f"excluded in round {r}: bad updates in {strikes} rounds "
                    f"(defence.max_bad_updates={limit})"
                )
                rnd.excluded.append(client_id)
                if client_id not in rnd.updates:
                    rnd.dropped[client_id] = self.excluded[client_id]
                log.warning("%s %s", client_id, self.excluded[client_id])
            self._cv.notify_all()

    def _failed(self, msg: WireMessage) -> None:
        if msg.tensors:
            raise FedqError("a 'failed' message carries no tensors")
        why = " ".join(msg.tags.get("error", "no reason given").split())[:300]
        with self._cv:
            rnd, member = self._selected(msg.client_id, msg.round)
            rnd.dropped[member.client_id] = f"the client failed: {why}"
            self._cv.notify_all()
        log.warning("round %d: %s dropped (it failed: %s)", msg.round, msg.client_id, why)

    def exchange(self, msg: WireMessage) -> WireMessage:
        """One in-round exchange of a selected client (split mode: a step), run in the turn
        order of the policy (module docstring)."""
        if self.policy.turns is None:
            raise FedqError("this run has no exchanges inside a round")
        w = self.workload
        assert isinstance(w, ExchangeWorkload)  # checked when the engine was made
        with self._cv:
            rnd, member = self._selected(msg.client_id, msg.round)
            turns = rnd.turns
            assert turns is not None  # every round of a policy with turns has them
            done = turns.next_of(member, msg)
            turns.busy.add(member.client_id)
        try:
            with self._cv:
                while True:  # wait for the clients before this one to finish their turns
                    if self._round is not rnd or member.client_id in rnd.dropped:
                        raise FedqError(f"{member.client_id} is no longer in round {msg.round}")
                    if not turns.waiting_for(member, rnd.active()):
                        break
                    self._cv.wait(_TICK)
            try:
                reply = w.exchange(msg.round, member, msg)
            except Exception as e:
                with self._cv:
                    if member.client_id not in rnd.dropped:
                        rnd.dropped[member.client_id] = f"step {msg.step} failed: {e}"
                        log.warning(
                            "round %d: %s dropped (step failed: %s)", rnd.index, member.client_id, e
                        )
                raise
            with self._cv:
                turns.made[member.client_id] = done + 1
            return reply
        finally:
            with self._cv:
                turns.busy.discard(member.client_id)
                self._cv.notify_all()

    # ------------------------------------------------------------------ the loop
    def start(self, start_round: int = 0) -> None:
        """Run rounds ``start_round ..`` in a background thread."""
        if self._thread is not None:
            raise FedqError("the round engine is already running")
        self.next_round = start_round
        self._thread = threading.Thread(target=self._run, name="fedq-rounds", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end; True when it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def outcome(self) -> RunOutcome | None:
        """How the run ended (None while it runs)."""
        return self._done

    @property
    def done_reason(self) -> str | None:
        return None if self._done is None else self._done.reason

    def stop(self, reason: str, ending: Ending = Ending.STOPPED) -> None:
        """End the run: the open round is discarded, every work stream gets DONE."""
        with self._cv:
            self._stopping = True
            if self._done is None:
                self._done = RunOutcome(ending, reason)
            self._cv.notify_all()

    def _finish(self, outcome: RunOutcome) -> None:
        with self._cv:
            if self._done is None:
                self._done = outcome
            self._round = None
            self._cv.notify_all()
        if self.hooks is not None:
            self.hooks.on_done(self._done or outcome)

    def _run(self) -> None:
        rounds = self.cfg.rounds
        try:
            for r in range(self.next_round, rounds.count):
                selected = self._open(r)
                if selected is None:
                    return self._finish(self._done or RunOutcome(Ending.STOPPED, "stopped"))
                self._collect()
                if self._stopping:  # the open round is abandoned: a resume runs it again
                    with self._cv:
                        self._round = None
                    if isinstance(self.workload, RollbackWorkload):
                        self.workload.abandon_round(r)
                    return self._finish(self._done or RunOutcome(Ending.STOPPED, "stopped"))
                record = self._close(r)
                self.next_round = r + 1
                if self.hooks is not None:
                    self.hooks.on_round(record)
            self._finish(RunOutcome(Ending.COMPLETED, f"completed {rounds.count} rounds"))
        except BaseException as e:  # report, never hang the clients
            self.error = e
            log.exception("round engine failed")
            self._finish(RunOutcome(Ending.FAILED, f"server error: {type(e).__name__}: {e}"))

    def _open(self, r: int) -> list[Member] | None:
        rounds = self.cfg.rounds
        with self._cv:
            self._current = r
            remaining = len(self.roster) - len(self.excluded)
        if remaining < rounds.min_clients:
            why = (
                f"only {remaining} of {len(self.roster)} clients are not excluded; a round "
                f"needs rounds.min_clients={rounds.min_clients}"
            )
            log.warning("stopping before round %d: %s", r, why)
            self.stop(why, Ending.TOO_FEW_CLIENTS)
            return None
        with self._cv:
            logged = ""
            while not self._stopping:
                alive = self._available()
                if len(alive) >= rounds.min_clients:
                    break
                self._waiting = (
                    f"round {r}: waiting for clients, {len(alive)} of "
                    f"{rounds.min_clients} needed available"
                )
                if self._waiting != logged:
                    log.info(self._waiting)
                    logged = self._waiting
                self._cv.notify_all()
                self._cv.wait(_TICK)
            if self._stopping:
                return None
            sizes = {m.index: m.num_examples for m in self._members.values()}
            self._waiting = f"round {r}: selecting"
        ledger = self.workload.ledger
        k = min(rounds.clients_per_round, len(alive))
        try:
            ledger.check_round(sizes, k)
            pool = ledger.eligible([m.index for m in alive], sizes)
            if len(pool) < min(k, rounds.min_clients) or not pool:
                raise PrivacyBudgetExceeded(
                    f"privacy budget: only {len(pool)} available clients can take part again "
                    f"within the target (a round needs {rounds.min_clients})"
                )
        except PrivacyBudgetExceeded as e:
            log.warning("stopping before round %d: %s", r, e)
            self.stop(str(e), Ending.BUDGET)
            return None
        chosen = select_clients(r, pool, min(k, len(pool)), self.cfg.seed)
        ledger.charge(chosen, sizes)
        if self.hooks is not None:
            self.hooks.on_open(r, ledger.state_dict())
        by_index = {m.index: m for m in alive}
        selected = [by_index[i] for i in chosen]
        self.workload.open_round(r, selected)
        now = time.monotonic()
        with self._cv:
            take = self.policy.turns
            turns = None if take is None else _Turns(take.steps)
            self._round = _Open(r, selected, now + rounds.timeout_s, now, turns=turns)
            self._cv.notify_all()
        log.info("round %d: %s", r, ", ".join(m.client_id for m in selected))
        return selected

    def _collect(self) -> None:
        with self._cv:
            rnd = self._round
            assert rnd is not None
            while not rnd.complete() and not self._stopping:
                left = rnd.deadline - time.monotonic()
                if left <= 0:
                    why = f"no update before the deadline ({self.cfg.rounds.timeout_s:g} s)"
                    for m in rnd.active():
                        rnd.dropped[m.client_id] = why
                        log.warning("round %d: %s dropped (deadline)", rnd.index, m.client_id)
                    break
                self._cv.wait(min(left, _TICK))

    def _close(self, r: int) -> dict[str, Any]:
        with self._cv:
            rnd = self._round
            assert rnd is not None
            self._round = None  # from here on an upload for round r is refused
            self._waiting = f"round {r} closed"
            self._cv.notify_all()
        updates = sorted(rnd.updates.values(), key=lambda u: u.member.index)
        apply = len(updates) >= self.cfg.rounds.min_clients
        record = self.workload.close_round(r, updates, apply)
        record.setdefault("rejected", None)  # the workload refused the new model: why
        if not apply:
            log.warning(
                "round %d discarded: %d of %d updates arrived (min_clients=%d)",
                r,
                len(updates),
                len(rnd.selected),
                self.cfg.rounds.min_clients,
            )
        record.update(
            round=r,
            applied=apply and record["rejected"] is None,
            clients_selected=len(rnd.selected),
            clients_ok=len(updates),
            clients_dropped=len(rnd.dropped),
            updated=[u.member.client_id for u in updates],
            dropped=dict(rnd.dropped),
            refused={cid: dict(v) for cid, v in sorted(rnd.refused.items())},
            excluded=sorted(rnd.excluded),
            epsilon=self.workload.ledger.epsilon(),
            round_seconds=round(time.monotonic() - rnd.opened, 3),
        )
        return record

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """What resuming needs of the server: the next round, the run id, the workload (model,
        strategy, codecs, privacy ledger), the example count each client declared."""
        return {
            "next_round": self.next_round,
            "run_id": self.run_id,
            "roster": list(self.roster),
            "workload": self.workload.state_dict(),
            "declared": dict(self._declared),
            "defence": {"strikes": dict(self._strikes), "excluded": dict(self.excluded)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["roster"]) != self.roster:
            raise FedqError("the checkpoint's roster differs from this run's clients")
        self.run_id = str(state["run_id"])
        self.next_round = int(state["next_round"])
        self._declared = {str(c): int(n) for c, n in state.get("declared", {}).items()}
        self.workload.load_state_dict(state["workload"])
        defence = state.get("defence", {})
        self._strikes = {str(c): int(n) for c, n in defence.get("strikes", {}).items()}
        self.excluded = {str(c): str(w) for c, w in defence.get("excluded", {}).items()}
