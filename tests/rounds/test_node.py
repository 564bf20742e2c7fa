"""The client node against a scripted connection: it runs its tasks, reconnects with backoff when
the server goes away and carries on with the same run, gives up after a while, refuses a server
that started a different run, reports version mismatches clearly, and reports a task that raised
(a bug, an overflow) as failed while it keeps serving."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import torch
from support.loopback import LoopbackConnection

from fedq.config import config_from_dict
from fedq.errors import FedqError, TlsMismatch, TransportError
from fedq.rounds.engine import RoundEngine
from fedq.rounds.node import Backoff, ClientNode
from fedq.rounds.workload import Member, NoPrivacy, Update
from fedq.transport.counters import ByteCounter
from fedq.wire.control import Assignment, ClientInfo, Joined, Registration, WorkItem
from fedq.wire.message import WireMessage


def _joined(run_id: str = "run-1", **kw: Any) -> Joined:
    return Joined(
        run_id=run_id,
        config_json="{}",
        client_index={"c": 0},
        num_classes=2,
        input_dim=4,
        fedq_version="x",
        **kw,
    )


class Feed:
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[WorkItem]:
        for it in self.items:
            if isinstance(it, Exception):
                raise it
            yield it

    def cancel(self) -> None:
        return None


class Script:
    """A connection whose calls follow a script: lists of results or exceptions."""

    def __init__(self, registers: list[Any], feeds: list[list[Any]]) -> None:
        self.registers = registers
        self.feeds = feeds
        self.calls: list[str] = []
        self.pushed: list[Any] = []

    def register(self, reg: Registration) -> Joined:
        self.calls.append("register")
        r = self.registers.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    def work(self, run_id: str) -> Feed:
        self.calls.append(f"work {run_id}")
        return Feed(self.feeds.pop(0))

    def push_update(self, msg: Any) -> int:
        self.pushed.append(msg)
        return 0


class Runner:
    def __init__(self) -> None:
        self.ran: list[tuple[str, int]] = []
        self.closed: list[int] = []

    def run(self, task: Assignment, conn: Any) -> dict[str, Any]:
        self.ran.append((task.client_id, task.round))
        return {}

    def round_closed(self, r: int) -> None:
        self.closed.append(r)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def _node(conn: Script, **kw: Any) -> tuple[ClientNode, Runner]:
    runner = Runner()
    events: list[tuple[str, dict[str, Any]]] = []
    node = ClientNode(
        conn,
        [ClientInfo("c", 10)],
        lambda joined: runner,  # type: ignore[arg-type]
        on_event=lambda k, i: events.append((k, i)),
        seed=0,
        backoff=kw.pop("backoff", Backoff(base=0.01, cap=0.02, give_up_after=5)),
    )
    node.events = events  # type: ignore[attr-defined]
    return node, runner


def _task(r: int) -> WorkItem:
    return WorkItem("task", r, (Assignment("c", r, 10.0),))


def test_runs_tasks_until_done() -> None:
    conn = Script(
        [_joined()],
        [
            [
                WorkItem("wait", 0, reason="waiting"),
                _task(0),
                _task(1),
                WorkItem("done", 2, reason="completed 2 rounds"),
            ]
        ],
    )
    node, runner = _node(conn)
    assert node.run() == "completed 2 rounds"
    assert runner.ran == [("c", 0), ("c", 1)] and node.stats["tasks"] == 2
    assert runner.closed == [0, 0, 1, 2]  # each item tells the runner the server's round


def test_reconnects_with_backoff_and_rejoins_the_same_run() -> None:
    gone = TransportError("UNAVAILABLE", "connection refused")
    conn = Script(
        [_joined(), gone, gone, _joined()],  # the server restarts: two failed registrations
        [[_task(0), gone], [_task(1), WorkItem("done", 2, reason="completed")]],
    )
    node, runner = _node(conn)
    assert node.run() == "completed"
    assert runner.ran == [("c", 0), ("c", 1)]
    assert node.stats["reconnects"] == 1
    kinds = [k for k, _ in node.events]  # type: ignore[attr-defined]
    assert kinds.count("retry") == 2 and "reconnect" in kinds


def test_gives_up_after_the_configured_time() -> None:
    gone = TransportError("UNAVAILABLE", "connection refused")
    conn = Script([gone] * 1000, [])
    node, _ = _node(conn, backoff=Backoff(base=0.01, cap=0.01, give_up_after=0.2))
    with pytest.raises(TransportError, match=r"gave up after 0\.2 s"):
        node.run()


def test_a_held_client_id_is_waited_for_on_rejoining_and_an_error_on_first_joining() -> None:
    """Back from a network failure, the server may still hold the old work stream: the node
    retries until the server has seen it close. A first registration refused so means another
    process holds the id: no retry."""
    gone = TransportError("UNAVAILABLE", "reset")
    held = TransportError("ALREADY_EXISTS", "c is already connected from another process")
    conn = Script(
        [_joined(), held, held, _joined()],
        [[_task(0), gone], [WorkItem("done", 1, reason="completed")]],
    )
    node, runner = _node(conn)
    assert node.run() == "completed" and runner.ran == [("c", 0)]
    assert conn.calls.count("register") == 4
    first = Script([held, _joined()], [])
    with pytest.raises(TransportError, match="ALREADY_EXISTS"):
        _node(first)[0].run()
    assert first.calls == ["register"]


def test_a_tls_mismatch_is_not_retried() -> None:
    wrong = TlsMismatch("UNAVAILABLE", "TLS: the server speaks TLS; pass --ca FILE")
    conn = Script([wrong, _joined()], [])
    with pytest.raises(TlsMismatch, match="pass --ca"):
        _node(conn)[0].run()
    assert conn.calls == ["register"]


def test_a_different_run_after_a_restart_is_an_error() -> None:
    gone = TransportError("UNAVAILABLE", "reset")
    conn = Script([_joined("run-1"), _joined("run-2")], [[_task(0), gone]])
    node, _ = _node(conn)
    with pytest.raises(FedqError, match="now runs a different run"):
        node.run()


def test_version_mismatch_is_reported_by_the_client() -> None:
    conn = Script([_joined(protocol_version=2)], [])
    node, _ = _node(conn)
    with pytest.raises(
        FedqError, match=r"the server speaks round protocol 2 .* this client speaks 3"
    ):
        node.run()
    refused = TransportError("FAILED_PRECONDITION", "this server speaks round protocol 4")
    node, _ = _node(Script([refused], []))
    with pytest.raises(TransportError, match="FAILED_PRECONDITION"):
        node.run()  # not retried: only a server that went away is


def test_a_failed_task_is_reported_and_the_node_goes_on() -> None:
    class Failing(Runner):
        def run(self, task: Assignment, conn: Any) -> dict[str, Any]:
            if task.round == 0:
                raise TransportError("FAILED_PRECONDITION", "round 0 is not open")
            return super().run(task, conn)

    conn = Script([_joined()], [[_task(0), _task(1), WorkItem("done", 2, reason="ok")]])
    runner = Failing()
    node = ClientNode(conn, [ClientInfo("c", 1)], lambda j: runner)  # type: ignore[arg-type]
    assert node.run() == "ok"
    assert node.stats == {"tasks": 1, "failed": 1, "reconnects": 0}
    # the server heard of it at once (a "failed" message), so the round need not wait for it
    [report] = conn.pushed
    assert (report.kind, report.client_id, report.round) == ("failed", "c", 0)
    assert "round 0 is not open" in report.tags["error"] and not report.tensors


def test_backoff_is_exponential_with_full_jitter_and_a_cap() -> None:
    b = Backoff(base=0.5, cap=4.0)
    rng = random.Random(1)
    for attempt, top in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        draws = [b.delay(attempt, rng) for _ in range(200)]
        assert min(draws) >= 0 and max(draws) <= top
        assert max(draws) > 0.8 * top  # the whole interval is used (full jitter)
    for attempt, elapsed, top in [(10, 0.1, 0.5), (10, 1.5, 1.5), (10, 30.0, 4.0), (1, 30.0, 1.0)]:
        draws = [b.delay(attempt, rng, elapsed) for _ in range(200)]  # never longer than the
        assert max(draws) <= top and max(draws) > 0.8 * top  # outage so far (at least base)


def test_wait_idle_waits_for_the_running_task_of_a_round() -> None:
    """Reading a worker's byte counters after the server closed a round waits for the round's
    task to finish here (its upload's reply may still be on the way)."""
    import threading

    gate = threading.Event()

    class Slow(Runner):
        def run(self, task: Assignment, conn: Any) -> dict[str, Any]:
            gate.wait(10)
            return super().run(task, conn)

    conn = Script([_joined()], [[_task(3), WorkItem("done", 4, reason="ok")]])
    runner = Slow()
    node = ClientNode(conn, [ClientInfo("c", 1)], lambda j: runner)  # type: ignore[arg-type]
    t = threading.Thread(target=node.run)
    t.start()
    while not node.stats["tasks"] and node._busy is None:
        threading.Event().wait(0.01)
    assert node.wait_idle(2, 0.1)  # an earlier round: nothing to wait for
    assert not node.wait_idle(3, 0.2)  # round 3 is still running
    gate.set()
    assert node.wait_idle(3, 5)
    t.join(5)
    assert runner.ran == [("c", 3)]


class _Ones:
    """Workload: the task is empty, an update adds its scalar ``value``."""

    ledger = NoPrivacy()

    def __init__(self) -> None:
        self.total = 0.0

    def info(self) -> dict[str, Any]:
        return {}

    def open_round(self, r: int, selected: Sequence[Member]) -> None:
        return None

    def task(self, r: int, member: Member) -> WireMessage:
        return WireMessage.global_model(member.client_id, r)

    def accept(self, r: int, member: Member, msg: WireMessage) -> Update:
        return Update(member, {"v": torch.tensor(msg.scalars["value"])}, 1.0, dict(msg.scalars))

    def close_round(self, r: int, updates: Sequence[Update], apply: bool) -> dict[str, Any]:
        if apply:
            self.total += sum(float(u.tensors["v"]) for u in updates)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total = float(state["total"])


class _Records:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_start(self, info: dict[str, Any]) -> None:
        return None

    def on_open(self, r: int, ledger: dict[str, Any]) -> None:
        return None

    def on_round(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def on_done(self, outcome: Any) -> None:
        return None


def test_a_task_that_raises_is_reported_as_failed_and_the_node_takes_the_next_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception that is no FedqError (torch's overflow of a huge learning rate, a bug in local
    training) fails that task only: the server drops the client from the round at once with the
    exception as the reason, and the node, still up, delivers its update in the next round."""
    cfg = config_from_dict(
        {
            "rounds": {
                "count": 2,
                "num_clients": 1,
                "clients_per_round": 1,
                "min_clients": 1,
                "timeout_s": 60,
            }
        }
    )
    work, hooks = _Ones(), _Records()
    engine = RoundEngine(
        cfg,
        work,
        ["client-0"],
        run_id="r1",
        config_json="{}",
        num_classes=2,
        input_dim=4,
        hooks=hooks,
    )

    class Overflowing(Runner):
        def run(self, task: Assignment, conn: Any) -> dict[str, Any]:
            conn.get_task(task.round, task.client_id)
            if task.round == 0:
                raise RuntimeError("value cannot be converted to type float\nwithout overflow")
            conn.push_update(WireMessage.update(task.client_id, task.round, scalars={"value": 1.0}))
            return super().run(task, conn)

    conn = LoopbackConnection(engine, client_id="client-0", counters=ByteCounter())
    runner = Overflowing()
    node = ClientNode(conn, [ClientInfo("client-0", 10)], lambda j: runner)  # type: ignore[arg-type]
    outcome: list[Any] = []
    t = threading.Thread(target=lambda: outcome.append(node.run()), daemon=True)
    with caplog.at_level(logging.DEBUG, logger="fedq.rounds.node"):
        t.start()
        assert engine.wait_available(1, 10) == 1
        engine.start()
        assert engine.join(30)
        t.join(10)
    assert outcome == ["completed 2 rounds"]  # the node ran to the end of the run
    why = "RuntimeError: value cannot be converted to type float without overflow"
    assert [(r["applied"], r["dropped"]) for r in hooks.records] == [
        (False, {"client-0": f"the client failed: {why}"}),
        (True, {}),
    ]
    assert work.total == 1.0 and runner.ran == [("client-0", 1)]
    assert node.stats == {"tasks": 1, "failed": 1, "reconnects": 0}
    here = [r for r in caplog.records if r.name == "fedq.rounds.node"]
    warned = [r for r in here if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warned] == [f"client-0: round 0 failed: {why}"]
    [traced] = [r for r in here if r.levelno == logging.DEBUG and r.exc_info]
    assert traced.exc_info is not None and traced.exc_info[0] is RuntimeError


def test_interrupts_are_not_reported_as_failed_tasks() -> None:
    """KeyboardInterrupt in a task ends the node (the person stopping the site wins)."""

    class Interrupted(Runner):
        def run(self, task: Assignment, conn: Any) -> dict[str, Any]:
            raise KeyboardInterrupt

    conn = Script([_joined()], [[_task(0), WorkItem("done", 1, reason="ok")]])
    runner = Interrupted()
    node = ClientNode(conn, [ClientInfo("c", 1)], lambda j: runner)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        node.run()
    assert conn.pushed == [] and node.stats["failed"] == 0
