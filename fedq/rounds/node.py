"""A client process's side of the round protocol: register, follow the work stream, run tasks.

One :class:`ClientNode` per process (``fedq join``: one logical client; a simulation worker: many).
It registers its clients, keeps the principal's work stream open (that is what makes its clients
available, and what tells the server at once when the process dies), and runs each task it is
given through a :class:`TaskRunner` (federated training or split steps). A task that raises
(a fedq error, or any exception of the client's own work: an overflow in training, a bug) is
reported to the server as failed and the node goes on with the next round; only a broken
connection or an interrupt leaves the loop. When the server goes
away it reconnects with exponential backoff and full jitter, registers again and, if the server
resumed the same run, carries on; a server that started a different run ends the node with a
clear error.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedq import __version__
from fedq.errors import FedqError, TlsMismatch, TransportError
from fedq.wire.control import Assignment, ClientInfo, Joined, Registration, WorkItem
from fedq.wire.message import WireMessage

log = logging.getLogger(__name__)

#: Status codes after which the node reconnects (the server restarted, the network failed).
RETRYABLE = frozenset({"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN", "ABORTED"})


def _retryable(e: TransportError, also: Collection[str] = ()) -> bool:
    return not isinstance(e, TlsMismatch) and (e.code in RETRYABLE or e.code in also)


class WorkFeed(Protocol):
    def __iter__(self) -> Iterator[WorkItem]: ...

    def cancel(self) -> None: ...


class Connection(Protocol):
    """What a node and its runner need from the transport (a TransportClient)."""

    def register(self, reg: Registration) -> Joined: ...

    def work(self, run_id: str) -> WorkFeed: ...

    def get_task(self, round: int, client_id: str | None = None) -> WireMessage: ...

    def push_update(self, msg: WireMessage) -> int: ...

    def split_step(self, msg: WireMessage) -> WireMessage: ...


class TaskRunner(Protocol):
    """Runs one logical client's task of one round over ``conn`` (download, local work, upload)
    and keeps every client's state between rounds. Running the same (client, round) again must
    give the same result (the server re-issues a task after it restarts)."""

    def run(self, task: Assignment, conn: Connection) -> dict[str, Any]: ...

    def round_closed(self, r: int) -> None:
        """Rounds before ``r`` are closed on the server: forget what re-running them needs."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: wait ``uniform(0, min(cap, base * 2**attempt,
    max(base, elapsed)))``, giving up once failures have lasted ``give_up_after`` seconds.

    ``elapsed`` is how long the failures have lasted so far: no wait is longer than the outage
    was, so a client is back at most about twice the outage after it began. Counting attempts
    alone, a server that restarts in 2 s is refused quickly five or six times, and the next wait
    may be up to 16 s."""

    base: float = 0.5
    cap: float = 20.0
    give_up_after: float = 600.0

    def delay(self, attempt: int, rng: random.Random, elapsed: float = float("inf")) -> float:
        top = min(self.cap, self.base * 2.0 ** min(attempt, 30), max(self.base, elapsed))
        return rng.uniform(0.0, top)


class ClientNode:
    """See the module docstring. ``make_runner`` builds the runner from the server's answer to
    the first registration (the run's configuration, each client's roster index)."""

    def __init__(
        self,
        conn: Connection,
        clients: Sequence[ClientInfo],
        make_runner: Callable[[Joined], TaskRunner],
        *,
        node: str = "",
        backoff: Backoff | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        seed: int | None = None,
    ) -> None:
        self.conn = conn
        self.clients = tuple(clients)
        self.make_runner = make_runner
        self.node = node
        self.backoff = backoff or Backoff()
        self.on_event = on_event
        self.joined: Joined | None = None
        self.runner: TaskRunner | None = None
        self.stats: dict[str, int] = {"tasks": 0, "failed": 0, "reconnects": 0}
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._feed: WorkFeed | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._busy: int | None = None  # the round of the task running now

    def _event(self, kind: str, **info: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, info)

    def stop(self) -> None:
        """Leave the run: close the work stream (the server drops this node's clients)."""
        self._stop.set()
        with self._lock:
            if self._feed is not None:
                self._feed.cancel()

    # -------------------------------------------------------------------------------- joining
    def register(self) -> Joined:
        """Register (retrying while the server is unreachable); build the runner the first time."""
        reg = Registration(clients=self.clients, fedq_version=__version__, node=self.node)
        # Coming back after a network failure, the server may not have seen the old work stream
        # close yet and refuses this id as held (ALREADY_EXISTS) until it has: wait for it. A
        # first registration refused so is a second process with this id: an error.
        held = {"ALREADY_EXISTS"} if self.joined is not None else set()
        joined = self._retry(lambda: self.conn.register(reg), "register", held)
        if joined.protocol_version != reg.protocol_version:
            raise FedqError(
                f"the server speaks round protocol {joined.protocol_version} (fedq "
                f"{joined.fedq_version}); this client speaks {reg.protocol_version} (fedq "
                f"{__version__}): install the same fedq release on both sides"
            )
        if joined.wire_format_version != reg.wire_format_version:
            raise FedqError(
                f"the server uses wire format {joined.wire_format_version} (fedq "
                f"{joined.fedq_version}); this client {reg.wire_format_version} (fedq "
                f"{__version__}): install the same fedq release on both sides"
            )
        if self.joined is not None and joined.run_id != self.joined.run_id:
            raise FedqError(
                f"the server now runs a different run ({joined.run_id}, was "
                f"{self.joined.run_id}): this client's state belongs to the old one; start it again"
            )
        self.joined = joined
        if self.runner is None:
            self.runner = self.make_runner(joined)
        self._event("joined", run_id=joined.run_id, clients=len(self.clients))
        return joined

    def _retry(self, fn: Callable[[], Any], what: str, also: Collection[str] = ()) -> Any:
        """``fn()``, again with backoff while it fails with a RETRYABLE status (or one of
        ``also``), until ``give_up_after``. A TLS mismatch is never retried."""
        start, attempt = time.monotonic(), 0
        while True:
            try:
                return fn()
            except TransportError as e:
                if not _retryable(e, also) or self._stop.is_set():
                    raise
                if time.monotonic() - start > self.backoff.give_up_after:
                    raise TransportError(
                        e.code, f"gave up after {self.backoff.give_up_after:g} s: {e.reason}"
                    ) from e
                wait = self.backoff.delay(attempt, self._rng, time.monotonic() - start)
                log.warning("%s failed (%s); retrying in %.1f s", what, e, wait)
                self._event("retry", what=what, error=str(e), wait=wait)
                attempt += 1
                if self._stop.wait(wait):
                    raise TransportError("CANCELLED", "stopped while reconnecting") from e

    # -------------------------------------------------------------------------------- the loop
    def run(self) -> str:
        """Take part until the server says the run is over; returns its reason."""
        if self.joined is None:
            self.register()
        while not self._stop.is_set():
            assert self.joined is not None
            try:
                reason = self._follow(self.joined.run_id)
            except TransportError as e:
                if not _retryable(e, {"ALREADY_EXISTS"}) or self._stop.is_set():
                    raise
                self.stats["reconnects"] += 1
                log.warning("work stream broke (%s); reconnecting", e)
                self._event("reconnect", error=str(e))
                self.register()
                continue
            except FedqError as e:
                if "register again" not in str(e):
                    raise
                self.register()
                continue
            if reason is not None:
                self._event("done", reason=reason)
                return reason
        return "stopped"

    def _follow(self, run_id: str) -> str | None:
        feed = self.conn.work(run_id)
        with self._lock:
            self._feed = feed
        try:
            for item in feed:
                if self._stop.is_set():
                    return None
                assert self.runner is not None
                self.runner.round_closed(item.round)
                if item.action == "done":
                    return item.reason
                if item.action == "wait":
                    self._event("wait", round=item.round, reason=item.reason)
                    continue
                for task in item.tasks:
                    self._run_task(task)
            return None if self._stop.is_set() else "the server closed the work stream"
        finally:
            with self._lock:
                self._feed = None

    def wait_idle(self, r: int, timeout: float) -> bool:
        """Wait until no task of round ``r`` or earlier runs here (the server may close a round
        before the last upload's reply reached its client); False on timeout."""
        end = time.monotonic() + timeout
        with self._idle:
            while self._busy is not None and self._busy <= r:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _run_task(self, task: Assignment) -> None:
        assert self.runner is not None
        t0 = time.perf_counter()
        with self._idle:
            self._busy = task.round
        try:
            result = self.runner.run(task, self.conn)
        except TransportError as e:
            if e.code in RETRYABLE:
                raise  # the server went away: reconnect, the task comes back if still open
            return self._failed(task, str(e))
        except FedqError as e:
            return self._failed(task, str(e))
        except Exception as e:  # a bug or a numeric failure in this client's own work
            log.debug("%s: round %d raised", task.client_id, task.round, exc_info=True)
            return self._failed(task, f"{type(e).__name__}: {e}")
        finally:
            with self._idle:
                self._busy = None
                self._idle.notify_all()
        self.stats["tasks"] += 1
        self._event(
            "task",
            client=task.client_id,
            round=task.round,
            seconds=time.perf_counter() - t0,
            **result,
        )

    def _failed(self, task: Assignment, error: str) -> None:
        """The task cannot be finished: say so to the server (which drops the client from the
        round now rather than at its deadline) and go on with the next work item. ``error`` is
        the reason, sent on one line and cut to 300 characters."""
        why = " ".join(error.split())[:300]
        self.stats["failed"] += 1
        log.warning("%s: round %d failed: %s", task.client_id, task.round, why)
        self._event("failed", client=task.client_id, round=task.round, error=why)
        report = WireMessage.failed(task.client_id, task.round, why)
        try:
            self.conn.push_update(report)
        except (TransportError, FedqError) as e:  # the round may have closed meanwhile
            log.info(
                "%s: could not report the failure of round %d: %s", task.client_id, task.round, e
            )
