"""A simulation worker that dies (its Ray actor process killed) is reported with its clients and
why; the run goes on with the other worker, or stops cleanly with the reason when too few clients
remain for a round. It never hangs."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedq.config import config_from_dict
from fedq.report import read_metrics
from fedq.runtime.simulate import simulate

pytestmark = pytest.mark.slow


def _cfg(min_clients: int) -> Any:
    return config_from_dict(
        {
            "seed": 1,
            "data": {"name": "digits", "max_train": 400},
            "model": {"name": "mlp", "hidden": 8},
            "rounds": {
                "count": 4,
                "num_clients": 6,
                "clients_per_round": max(2, min_clients),
                "min_clients": min_clients,
                "timeout_s": 60,
            },
            "runtime": {"backend": "ray", "workers": 2, "object_store_mb": 128},
        }
    )


def _kill_a_worker() -> int:
    me = psutil.Process(os.getpid())
    for p in me.children(recursive=True) + list(psutil.process_iter()):
        try:
            if "WorkerHost" in " ".join(p.cmdline()):
                os.kill(p.pid, signal.SIGKILL)
                return p.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError("no WorkerHost actor process found")


@pytest.mark.parametrize("min_clients", [1, 4], ids=["goes-on", "stops-cleanly"])
def test_a_dead_worker_is_reported_and_the_run_goes_on_or_stops(
    tmp_path: Path, min_clients: int
) -> None:
    killed: list[int] = []

    def on_round(rec: dict[str, Any]) -> None:
        if rec["round"] == 0:
            killed.append(_kill_a_worker())

    summary = simulate(_cfg(min_clients), tmp_path / "run", on_round=on_round)
    assert killed
    lost = summary["workers_lost"]
    assert len(lost) == 1
    ((who, why),) = lost.items()
    assert who in ("worker-0", "worker-1") and why
    if min_clients == 1:  # 3 clients remain: the rounds go on with them
        assert summary["rounds_completed"] == 4 and summary["stopped_reason"] is None
    else:  # 3 left, a round needs 4: stopped, with the reason; nothing applied after the loss
        recs = read_metrics(tmp_path / "run")
        assert recs[0]["applied"] and all(not r["applied"] for r in recs[1:])
        assert len(recs) <= 2  # at most the round that was open when the worker died
        assert "worker(s) lost" in summary["stopped_reason"]
        assert "rounds.min_clients=4" in summary["stopped_reason"]
