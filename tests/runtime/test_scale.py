"""The driver's liveness checks at the end of a run (a long run at scale met it)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import fedq.runtime.simulate as simulate_module
from fedq.config import load_scenario
from fedq.runtime.hosts import ServerHost, WorkerHost
from fedq.runtime.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]


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
    cfg = load_scenario(ROOT / "scenarios" / "quickstart.yaml", [
        "fed.num_clients=4", "fed.clients_per_round=2", "fed.rounds=2", "model.hidden=8",
        "data.max_train=200", "runtime.backend=inprocess", "runtime.workers=2",
    ])  # fmt: skip
    result: dict[str, Any] = {}
    run = threading.Thread(target=lambda: result.update(simulate(cfg, tmp_path / "run")),
                           daemon=True)  # fmt: skip
    run.start()
    run.join(120)
    assert not run.is_alive(), "the driver missed the end of the run"
    assert result["rounds_completed"] == 2 and result["stopped_reason"] is None
    assert result["workers_lost"] == {}
