"""The round engine with a tiny stand-in workload: registration and versions, availability from
open work streams, selection, deadlines, dropped clients, all-or-nothing rounds, refused uploads,
and the fixed order of split steps."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from fedq.codec import raw
from fedq.config import config_from_dict
from fedq.errors import AlreadyConnected, FedqError
from fedq.rounds import client_name
from fedq.rounds import engine as engine_module
from fedq.rounds.engine import RoundEngine
from fedq.rounds.workload import (
    Ending,
    Member,
    NoPrivacy,
    RoundPolicy,
    RunOutcome,
    TakeTurns,
    Update,
)
from fedq.wire.control import ClientInfo, Registration
from fedq.wire.message import MessageKind, WireMessage


class Sums:
    """Workload: the task is a counter; an update adds its value; exchanges (steps) echo their
    index, in turns of ``steps_per_round`` (the engine's policy, :func:`_engine`)."""

    def __init__(self, steps_per_round: int = 0) -> None:
        self.ledger = NoPrivacy()
        self.total = 0.0
        self.closed: list[tuple[int, list[str], bool]] = []
        self.steps: list[tuple[str, int]] = []
        self.steps_per_round = steps_per_round

    def info(self) -> dict[str, Any]:
        return {"trainable_params": 1}

    def open_round(self, r: int, selected: Sequence[Member]) -> None:
        return None

    def task(self, r: int, member: Member) -> WireMessage:
        return WireMessage.global_model(member.client_id, r, scalars={"total": self.total})

    def accept(self, r: int, member: Member, msg: WireMessage) -> Update:
        if "value" not in msg.scalars:
            raise FedqError("no value")
        return Update(member, {"v": torch.tensor(msg.scalars["value"])}, 1.0, dict(msg.scalars))

    def close_round(self, r: int, updates: Sequence[Update], apply: bool) -> dict[str, Any]:
        if apply:
            self.total += sum(float(u.tensors["v"]) for u in updates)
        self.closed.append((r, [u.member.client_id for u in updates], apply))
        return {}

    def exchange(self, r: int, member: Member, msg: WireMessage) -> WireMessage:
        self.steps.append((member.client_id, msg.step))
        return WireMessage.gradients(member.client_id, r, msg.step)

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total = float(state["total"])


class Hooks:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.reason = ""

    def on_start(self, info: dict[str, Any]) -> None:
        return None

    def on_open(self, r: int, ledger: dict[str, Any]) -> None:
        return None

    def on_round(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def on_done(self, outcome: RunOutcome) -> None:
        self.outcome = outcome
        self.reason = outcome.reason


def _engine(
    n: int = 3,
    k: int = 2,
    rounds: int = 2,
    min_clients: int = 1,
    timeout: float = 30,
    workload: Any = None,
) -> tuple[RoundEngine, Any, Hooks]:
    schedule = {
        "count": rounds,
        "num_clients": n,
        "clients_per_round": k,
        "min_clients": min_clients,
        "timeout_s": timeout,
    }
    cfg = config_from_dict({"rounds": schedule})
    w = workload or Sums()
    hooks = Hooks()
    roster = [client_name(i) for i in range(n)]
    spr = getattr(w, "steps_per_round", 0)
    engine = RoundEngine(
        cfg,
        w,
        roster,
        run_id="r1",
        config_json="{}",
        num_classes=2,
        input_dim=4,
        hooks=hooks,
        policy=RoundPolicy(turns=TakeTurns(spr) if spr else None),
    )
    return engine, w, hooks


def _register(engine: RoundEngine, principal: str, *cids: str) -> None:
    engine.register(principal, Registration(tuple(ClientInfo(c, 10) for c in cids), "test"))


class Stream:
    """A principal's work stream read in a thread."""

    def __init__(self, engine: RoundEngine, principal: str) -> None:
        self.closed = threading.Event()
        self.items: list[Any] = []
        self._gen = engine.work(principal, engine.run_id, self.closed)
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for item in self._gen:
            self.items.append(item)

    def close(self) -> None:
        self.closed.set()
        self._t.join(5)

    def wait_for(self, action: str, round_index: int | None, timeout: float = 10) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for item in self.items:
                if item.action == action and round_index in (None, item.round):
                    return item
            time.sleep(0.02)
        raise AssertionError(f"no {action} item for round {round_index}: {self.items}")


def _deliver(engine: RoundEngine, cid: str, r: int, value: float = 1.0) -> None:
    engine.get_task(cid, r)
    engine.push_update(WireMessage.update(cid, r, scalars={"value": value}))


def test_versions_and_roster_are_checked_at_registration() -> None:
    engine, _, _ = _engine()
    old = Registration((ClientInfo("client-0", 5),), "0.0.1", protocol_version=2)
    with pytest.raises(FedqError, match=r"speaks round protocol 3 .* the client speaks 2"):
        engine.register("client-0", old)
    fmt = Registration((ClientInfo("client-0", 5),), "0.0.1", wire_format_version=2)
    with pytest.raises(FedqError, match=r"reads wire format 3 .* writes 2"):
        engine.register("client-0", fmt)
    with pytest.raises(FedqError, match="unknown client ids"):
        _register(engine, "x", "client-7")
    _register(engine, "worker-0", "client-0", "client-1")
    joined = engine.register("worker-0", Registration((ClientInfo("client-1", 10),), "t"))
    assert joined.client_index == {"client-1": 1} and joined.run_id == "r1"
    s = Stream(engine, "worker-0")
    with pytest.raises(FedqError, match="already connected from another process"):
        _register(engine, "thief", "client-1")
    with pytest.raises(FedqError, match="is not this server's run"):
        next(engine.work("worker-0", "other-run", threading.Event()))
    s.close()


def test_a_client_id_has_one_holder_while_its_work_stream_is_open() -> None:
    """A second registration of a client id whose work stream is open is refused, from the same
    principal too (one token per client: the principal is the client id), and so is a second
    work stream; once the stream closed (the site lost its network) it registers again. A
    worker hosting several clients keeps working."""
    engine, _, _ = _engine()
    _register(engine, "client-0", "client-0")
    s = Stream(engine, "client-0")
    s.wait_for("wait", None)
    with pytest.raises(AlreadyConnected, match="client-0 is already connected"):
        _register(engine, "client-0", "client-0")
    with pytest.raises(AlreadyConnected, match="already has its work stream open"):
        next(engine.work("client-0", engine.run_id, threading.Event()))
    assert [m.client_id for m in engine.available()] == ["client-0"]
    s.close()
    _register(engine, "client-0", "client-0")  # the old stream closed: back in
    _register(engine, "worker-0", "client-1", "client-2")
    w = Stream(engine, "worker-0")
    w.wait_for("wait", None)
    assert [m.client_id for m in engine.available()] == ["client-1", "client-2"]
    with pytest.raises(AlreadyConnected, match="client-2 is already connected"):
        _register(engine, "worker-0", "client-2")
    w.close()


def test_the_declared_example_count_is_fixed_for_the_run() -> None:
    """A client's count weights its updates: registering again with another count is refused,
    also after the server resumed from its checkpoint."""
    engine, _, _ = _engine()
    _register(engine, "client-0", "client-0")  # 10 examples
    changed = Registration((ClientInfo("client-0", 3),), "t")
    with pytest.raises(FedqError, match=r"declared 10 examples .* now declares 3"):
        engine.register("client-0", changed)
    assert engine.register("client-0", Registration((ClientInfo("client-0", 10),), "t"))
    resumed, _, _ = _engine()
    resumed.load_state_dict(engine.state_dict())
    with pytest.raises(FedqError, match=r"declared 10 examples .* now declares 3"):
        resumed.register("client-0", changed)
    _register(resumed, "client-1", "client-1")


def _tasks(streams: Mapping[str, Stream], r: int, n: int, timeout: float = 10) -> list[str]:
    """The clients whose streams received a TASK for round ``r`` (waits for ``n``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = sorted(
            cid
            for cid, s in streams.items()
            if any(it.action == "task" and it.round == r for it in s.items)
        )
        if len(got) >= n:
            return got
        time.sleep(0.02)
    raise AssertionError(f"only {got} got a task for round {r}")


def test_rounds_wait_for_available_clients_then_run_all_or_nothing() -> None:
    engine, w, hooks = _engine(n=3, k=2, rounds=2, min_clients=2)
    for i in range(3):
        _register(engine, client_name(i), client_name(i))
    engine.start()
    time.sleep(0.3)
    assert engine.available() == [] and not hooks.records  # nobody's stream is open: waiting
    streams = {client_name(i): Stream(engine, client_name(i)) for i in range(3)}
    first, second = _tasks(streams, 0, 2)  # k of the available clients were given round 0
    _deliver(engine, first, 0, 1.0)
    with pytest.raises(FedqError, match="already delivered"):
        _deliver(engine, first, 0, 5.0)  # a duplicate is refused, never counted
    unselected = ({"client-0", "client-1", "client-2"} - {first, second}).pop()
    with pytest.raises(FedqError, match="is not selected in round 0"):
        _deliver(engine, unselected, 0)
    with pytest.raises(FedqError, match="no value"):
        engine.push_update(WireMessage.update(second, 0))  # malformed: nothing kept
    _deliver(engine, second, 0, 2.0)
    _tasks(streams, 1, 2)
    assert hooks.records[0]["applied"] and w.total == 3.0
    assert hooks.records[0]["clients_ok"] == 2 and hooks.records[0]["dropped"] == {}
    with pytest.raises(FedqError, match="round 0 is not open"):
        _deliver(engine, first, 0)  # late: the round is closed
    for s in streams.values():
        s.close()  # everyone leaves mid-round 1: they are dropped, the round is discarded
    assert engine.join(10)
    assert hooks.records[1]["applied"] is False and w.total == 3.0
    assert set(hooks.records[1]["dropped"].values()) == {"its work stream closed"}
    assert w.closed[1] == (1, [], False)


def test_a_closed_work_stream_is_dropped_as_soon_as_the_engine_is_woken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The transport wakes the engine when a stream's call ends: the client is dropped then, not
    at the engine's next periodic look (made an hour here, so only the wake can end the wait)."""
    monkeypatch.setattr(engine_module, "_TICK", 3600.0)
    engine, w, hooks = _engine(n=2, k=2, rounds=1, min_clients=1)
    for i in range(2):
        _register(engine, client_name(i), client_name(i))
    streams = {client_name(i): Stream(engine, client_name(i)) for i in range(2)}
    engine.start()
    first, second = _tasks(streams, 0, 2)
    _deliver(engine, first, 0, 1.0)
    time.sleep(0.5)  # the streams have sent what the delivery changed and wait for news again
    gone = streams[second]
    gone.closed.set()
    engine.wake()
    gone._t.join(10)
    assert not gone._t.is_alive()  # the stream's generator returned, its clients are dropped
    assert engine.join(10)  # and the round closed with the other client's update
    assert hooks.records[0]["dropped"] == {second: "its work stream closed"}
    assert hooks.records[0]["applied"] and w.total == 1.0
    for s in streams.values():
        s.close()


def test_a_client_past_the_deadline_is_dropped_and_the_round_closes_with_the_rest() -> None:
    engine, w, hooks = _engine(n=2, k=2, rounds=1, min_clients=1, timeout=0.8)
    for i in range(2):
        _register(engine, client_name(i), client_name(i))
    streams = [Stream(engine, client_name(i)) for i in range(2)]
    engine.wait_available(2, 5)
    engine.start()
    streams[0].wait_for("task", 0)
    _deliver(engine, "client-0", 0, 4.0)  # client-1 hangs
    assert engine.join(10)
    rec = hooks.records[0]
    assert rec["applied"] and rec["clients_ok"] == 1 and w.total == 4.0
    assert "deadline" in rec["dropped"]["client-1"]
    assert hooks.reason == "completed 1 rounds" and hooks.outcome.ending is Ending.COMPLETED
    assert engine.outcome == RunOutcome(Ending.COMPLETED, "completed 1 rounds")
    assert hooks.outcome.stopped_reason is None
    with pytest.raises(FedqError):
        _deliver(engine, "client-1", 0)  # too late: refused
    assert streams[1].wait_for("done", None) is not None
    for s in streams:
        s.close()


def test_a_client_that_reports_failure_is_dropped_at_once_not_at_the_deadline() -> None:
    engine, w, hooks = _engine(n=2, k=2, rounds=1, min_clients=1, timeout=60)
    for i in range(2):
        _register(engine, client_name(i), client_name(i))
    streams = [Stream(engine, client_name(i)) for i in range(2)]
    engine.wait_available(2, 5)
    engine.start()
    streams[1].wait_for("task", 0)
    _deliver(engine, "client-0", 0, 2.0)
    with pytest.raises(FedqError, match="carries no tensors"):
        engine.push_update(
            WireMessage(
                kind=MessageKind.FAILED,
                client_id="client-1",
                round=0,
                tensors={"x": raw(torch.zeros(2))},
            )
        )
    t0 = time.monotonic()
    engine.push_update(WireMessage.failed("client-1", 0, "out of\nmemory"))
    assert engine.join(10) and time.monotonic() - t0 < 5  # not the 60 s deadline
    rec = hooks.records[0]
    assert rec["applied"] and rec["updated"] == ["client-0"] and w.total == 2.0
    assert rec["dropped"] == {"client-1": "the client failed: out of memory"}
    with pytest.raises(FedqError, match="expected an 'update' or 'failed' message"):
        engine.push_update(WireMessage.global_model("client-0", 0))
    for s in streams:
        s.close()


def test_a_step_sent_twice_at_once_is_refused_and_the_first_goes_on() -> None:
    gate = threading.Event()

    class Slow(Sums):
        def exchange(self, r: int, member: Member, msg: WireMessage) -> WireMessage:
            gate.wait(10)
            return super().exchange(r, member, msg)

    w = Slow(steps_per_round=2)
    engine, _, hooks = _engine(n=1, k=1, rounds=1, min_clients=1, workload=w)
    _register(engine, "client-0", "client-0")
    stream = Stream(engine, "client-0")
    engine.wait_available(1, 5)
    engine.start()
    stream.wait_for("task", 0)
    first = threading.Thread(
        target=engine.exchange, args=(WireMessage.activations("client-0", 0, 0),)
    )
    first.start()
    time.sleep(0.2)
    with pytest.raises(FedqError, match="step 0 is already in progress"):
        engine.exchange(WireMessage.activations("client-0", 0, 0))
    gate.set()
    first.join(10)
    engine.exchange(WireMessage.activations("client-0", 0, 1))
    engine.push_update(WireMessage.update("client-0", 0, scalars={"value": 1.0}))
    assert engine.join(10)
    assert w.steps == [("client-0", 0), ("client-0", 1)] and hooks.records[0]["clients_ok"] == 1
    stream.close()


def test_split_steps_run_in_roster_order_whatever_the_timing() -> None:
    """Clients on different threads send steps as fast as they can; the workload sees each
    client's whole turn in roster order; an out-of-order step is refused."""
    w = Sums(steps_per_round=3)
    engine, _, hooks = _engine(n=3, k=3, rounds=1, min_clients=3, workload=w)
    for i in range(3):
        _register(engine, client_name(i), client_name(i))
    streams = [Stream(engine, client_name(i)) for i in range(3)]
    engine.wait_available(3, 5)
    engine.start()
    streams[0].wait_for("task", 0)
    with pytest.raises(FedqError, match="out of order"):
        engine.exchange(WireMessage.activations("client-2", 0, 1))

    def client(i: int) -> None:
        cid = client_name(i)
        engine.get_task(cid, 0)
        for s in range(3):
            engine.exchange(WireMessage.activations(cid, 0, s))
        engine.push_update(WireMessage.update(cid, 0, scalars={"value": 1.0}))

    threads = [threading.Thread(target=client, args=(i,)) for i in (2, 1, 0)]  # last first
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert engine.join(10)
    assert w.steps == [(client_name(i), s) for i in range(3) for s in range(3)]
    assert hooks.records[0]["clients_ok"] == 3
    for s in streams:
        s.close()


def test_checkpoint_state_round_trips_and_checks_the_roster() -> None:
    engine, w, _ = _engine()
    w.total = 7.0
    engine.next_round = 2
    state = engine.state_dict()
    other, w2, _ = _engine()
    other.load_state_dict(state)
    assert (other.next_round, other.run_id, w2.total) == (2, "r1", 7.0)
    bigger, _, _ = _engine(n=4)
    with pytest.raises(FedqError, match="roster"):
        bigger.load_state_dict(state)


def test_stop_ends_the_run_and_every_stream_gets_done() -> None:
    engine, _, hooks = _engine(n=1, k=1, rounds=5, min_clients=1)
    _register(engine, "client-0", "client-0")
    s = Stream(engine, "client-0")
    engine.wait_available(1, 5)
    engine.start()
    s.wait_for("task", 0)
    engine.stop("operator stop")
    assert engine.join(10)
    assert s.wait_for("done", None).reason == "operator stop" and hooks.reason == "operator stop"
    assert hooks.outcome == RunOutcome(Ending.STOPPED, "operator stop")
    assert hooks.outcome.stopped_reason == "operator stop"
    assert hooks.records == [] and engine.next_round == 0  # the open round is not counted
    s.close()


def test_a_site_away_when_the_run_ends_is_told_when_it_comes_back() -> None:
    """untold() names the registered principals whose work stream has not delivered DONE (the
    server keeps answering for them); one that registers again after the end is told at once."""
    engine, _, _ = _engine(n=2, k=1, rounds=1, min_clients=1)
    _register(engine, "client-0", "client-0")
    _register(engine, "client-1", "client-1")
    away = Stream(engine, "client-1")
    away.wait_for("wait", None)
    away.close()  # its network failed
    stays = Stream(engine, "client-0")
    engine.start()
    _deliver(engine, _tasks({"client-0": stays}, 0, 1)[0], 0)
    assert engine.join(10)
    stays.wait_for("done", None)
    deadline = time.monotonic() + 10
    while engine.untold() != ["client-1"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.untold() == ["client-1"]
    _register(engine, "client-1", "client-1")  # back: registers again, hears the end
    back = Stream(engine, "client-1")
    assert back.wait_for("done", None).reason == "completed 1 rounds"
    back._t.join(10)
    assert engine.untold() == []
    stays.close()


def test_update_tensors_travel_as_the_workload_decodes_them() -> None:
    w = Sums()
    member = Member("client-0", 0, 3)
    up = w.accept(
        0,
        member,
        WireMessage.update(
            "client-0", 0, tensors={"x": raw(torch.ones(2))}, scalars={"value": 2.5}
        ),
    )
    assert float(up.tensors["v"]) == 2.5 and up.weight == 1.0
