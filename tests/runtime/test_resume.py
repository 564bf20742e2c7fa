"""Ctrl-C keeps finished rounds; resuming continues to exactly the uninterrupted result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedq.config import RunConfig, config_from_dict
from fedq.errors import ConfigError
from fedq.runtime.simulate import simulate


def _cfg() -> RunConfig:
    return config_from_dict(
        {
            "seed": 1,
            "data": {"name": "digits", "max_train": 300},
            "model": {"name": "mlp", "hidden": 16},
            "fed": {"num_clients": 4, "clients_per_round": 2, "rounds": 4},
            "compression": {
                "uplink": {
                    "policy": "fixed",
                    "bits": 3,
                    "error_feedback": True,
                    "stochastic": True,
                },
                "downlink": {"policy": "fixed", "bits": 6},
            },
            "runtime": {"backend": "inprocess", "workers": 2},
        }
    )


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_interrupt_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    full = simulate(_cfg(), tmp_path / "full")

    def stop_after_round_1(rec: dict[str, Any]) -> None:
        if rec["round"] == 1:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    partial = simulate(_cfg(), part, on_round=stop_after_round_1)
    assert partial["interrupted"] is True
    assert [r["round"] for r in _records(part)] == [0, 1]
    assert (part / "summary.json").exists() and (part / "report.png").exists()

    resumed = simulate(_cfg(), part, resume=True)
    assert [r["round"] for r in _records(part)] == [0, 1, 2, 3]
    assert resumed["final_accuracy"] == full["final_accuracy"]
    assert resumed["bytes_wire_total"] == full["bytes_wire_total"]
    a, b = _records(tmp_path / "full"), _records(part)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[-1]["cum_bytes"] == b[-1]["cum_bytes"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no checkpoint\.pt"):
        simulate(_cfg(), tmp_path / "nothing", resume=True)
