"""An authenticated client that sends poisoned (3e38 everywhere), oversized (wrong shape) and
tampered (random codes, shifted offsets) updates among honest ones, against a live server (real
gRPC on loopback, each side with its own token): every bad update is refused, the run finishes
with the accuracy of a clean run within a point (median aggregation, same seeds), the model is
finite throughout, and the process's memory stays bounded."""

from __future__ import annotations

import math
from typing import Any

import psutil

from fedq.bench.robust import BAD, run_attacked
from fedq.config import config_from_dict

ROUNDS = 6


def _cfg() -> Any:
    return config_from_dict(
        {
            "seed": 1,
            "data": {"name": "digits", "partition": "iid"},
            "model": {"name": "mlp", "hidden": 32},
            "train": {"batch_size": 16, "lr": 0.1},
            "rounds": {
                "count": ROUNDS,
                "num_clients": 6,
                "clients_per_round": 6,
                "eval_every": 1,
                "timeout_s": 60,
            },
            "compression": {"uplink": {"policy": "fixed", "bits": 8}},
            "runtime": {"backend": "inprocess"},
            # the settings docs/algorithms.md recommends for untrusted clients on scaled features
            "defence": {"aggregator": "median", "max_abs_ratio": 100.0, "max_bad_updates": 0},
        }
    )


def test_bad_updates_from_an_authenticated_client_are_refused_and_the_run_holds() -> None:
    cfg = _cfg()
    clean = run_attacked(cfg, [], BAD)
    rss = psutil.Process().memory_info().rss
    hostile = run_attacked(cfg, [2], BAD)
    grown = psutil.Process().memory_info().rss - rss
    assert clean["reason"] == hostile["reason"] == f"completed {ROUNDS} rounds"
    assert hostile["sent"] == ROUNDS and hostile["refused"] == ROUNDS  # every one refused
    recs = hostile["records"]
    assert all(r["applied"] and r["rejected"] is None for r in recs)
    assert all(set(r["refused"]) == {"client-2"} for r in recs)
    reasons = " ".join(r["refused"]["client-2"]["reason"] for r in recs)
    assert "beyond the bound" in reasons and "has shape" in reasons
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert abs(hostile["accuracy"] - clean["accuracy"]) <= 0.01, (
        hostile["accuracy"],
        clean["accuracy"],
    )
    assert grown < 300 << 20, f"memory grew by {grown >> 20} MiB over the hostile run"
