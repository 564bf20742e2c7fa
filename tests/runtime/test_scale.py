"""Many logical clients, few selected: a short 1,000-client simulation over real gRPC (in-process
hosts) where traffic is counted for exactly the selected clients, and where client state, data
and checkpoints grow with the clients that took part, not with the pool; and the driver's
liveness checks at the end of a run (a long run at scale met it)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

import fedq.runtime.simulate as simulate_module
from fedq.config import load_scenario
from fedq.runtime.checkpoint import load_checkpoint
from fedq.runtime.hosts import ServerHost, WorkerHost
from fedq.runtime.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]


def test_a_thousand_clients_cost_only_what_the_selected_ones_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts: list[WorkerHost] = []

    class Kept(WorkerHost):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            hosts.append(self)

    monkeypatch.setattr(simulate_module, "WorkerHost", Kept)
    cfg = load_scenario(
        ROOT / "scenarios" / "scale_mnist1d.yaml",
        [
            "rounds.num_clients=1000",
            "rounds.clients_per_round=20",
            "rounds.count=3",
            "data.num_samples=5000",
            "data.max_test=500",
            "runtime.backend=inprocess",
            "runtime.workers=2",
        ],
    )
    out = tmp_path / "run"
    summary = simulate(cfg, out)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2] and summary["stopped_reason"] is None
    assert all(r["clients_ok"] == 20 and r["applied"] for r in records)
    selected = {c for r in records for c in r["updated"]}
    assert 20 < len(selected) <= 60

    # the clients' own transports counted traffic both ways for exactly the selected clients,
    # and in all the bytes the server's transport counted
    assert len(hosts) == 2
    counted: dict[str, dict[str, int]] = {}
    for h in hosts:
        counted.update(h.counters()["clients"])
    assert counted.keys() == selected
    assert all(c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in counted.values())
    assert sum(c["bytes_up"] for c in counted.values()) == summary["bytes_up_total"]
    assert sum(c["bytes_down"] for c in counted.values()) == summary["bytes_down_total"]

    # per-client state exists only for the clients that ran a task
    held = {cid for h in hosts for cid in h.node.runner.states}  # type: ignore[union-attr]
    assert held == selected
    # each worker keeps one copy of its own clients' rows, not the whole data set
    for h in hosts:
        shards = h.node.runner.shards  # type: ignore[union-attr]
        assert len(shards) == 500
        data = {id(s.data) for s in shards.values()}
        assert len(data) == 1
        assert len(next(iter(shards.values())).data) == sum(s.size for s in shards.values())

    # the checkpoint holds those states: one segment per round with that round's 20 clients
    ckpt = load_checkpoint(out)
    assert ckpt["clients"].keys() == selected
    assert [s["entries"] for s in ckpt["client_segments"]] == [20, 20, 20]
    segments = sorted(p.name for p in out.glob("clients-*.pt"))
    assert segments == ["clients-1.pt", "clients-2.pt", "clients-3.pt"]


def test_the_end_of_a_run_is_not_taken_for_dead_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers hear that the run is over before the driver does; a liveness check made when
    the end arrives must neither report them lost nor drop the end (the driver would then wait
    for events forever)."""
    hosts: list[WorkerHost] = []

    class Kept(WorkerHost):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            hosts.append(self)

    class LateEnd(ServerHost):
        def next_event(self, timeout: float) -> dict[str, Any] | None:
            event = super().next_event(timeout)
            if event is not None and "done" in event:
                for h in hosts:  # every worker has ended before the driver hears of the end
                    assert h._thread is not None
                    h._thread.join(30)
            return event

    monkeypatch.setattr(simulate_module, "WorkerHost", Kept)
    monkeypatch.setattr(simulate_module, "ServerHost", LateEnd)
    monkeypatch.setattr(simulate_module, "WORKER_CHECK_S", 0.0)  # check at every event
    cfg = load_scenario(
        ROOT / "scenarios" / "quickstart.yaml",
        [
            "rounds.num_clients=4",
            "rounds.clients_per_round=2",
            "rounds.count=2",
            "model.hidden=8",
            "data.max_train=200",
            "runtime.backend=inprocess",
            "runtime.workers=2",
        ],
    )
    result: dict[str, Any] = {}
    run = threading.Thread(
        target=lambda: result.update(simulate(cfg, tmp_path / "run")), daemon=True
    )
    run.start()
    run.join(120)
    assert not run.is_alive(), "the driver missed the end of the run"
    assert result["rounds_completed"] == 2 and result["stopped_reason"] is None
    assert result["workers_lost"] == {}
