"""``summarize`` on a hand-made record list, and the plot helpers' arithmetic."""

from __future__ import annotations

import pytest

from fedq.report import SUMMARY_KEYS, cumulative_wire_bytes, summarize
from fedq.report.plots import use_log_x

RECORDS: list[dict[str, object]] = [
    {
        "round": 0,
        "accuracy": None,
        "bytes_up": 100,
        "bytes_down": 400,
        "bytes_fp32": 4000,
        "epsilon": 0.5,
    },
    {
        "round": 1,
        "accuracy": 0.6,
        "bytes_up": 100,
        "bytes_down": 300,
        "bytes_fp32": 4000,
        "epsilon": 1.0,
    },
    {
        "round": 2,
        "accuracy": 0.8,
        "bytes_up": 50,
        "bytes_down": 250,
        "bytes_fp32": 4000,
        "epsilon": 1.5,
    },
    {"round": 2, "accuracy": 0.75},  # an eval row for the same round, no bytes
    {"round": 3, "bytes_up": 50, "bytes_down": 250, "bytes_fp32": 4000, "epsilon": None},
]


def test_summarize_hand_made() -> None:
    s = summarize(RECORDS, wall_seconds=12.5, extra={"scenario": "mnist"})
    assert s == {
        "final_accuracy": 0.75,  # last non-null
        "best_accuracy": 0.8,
        "bytes_up_total": 300,
        "bytes_down_total": 1200,
        "bytes_wire_total": 1500,
        "bytes_fp32_total": 16000,
        "compression_ratio": pytest.approx(16000 / 1500),
        "epsilon_spent": 1.5,  # last reported
        "rounds_completed": 4,  # distinct rounds 0..3
        "rounds_applied": 4,  # none says applied: false
        "rounds_discarded": 0,
        "wall_seconds": 12.5,
        "scenario": "mnist",
    }
    assert set(SUMMARY_KEYS) <= set(s)


def test_summarize_empty_and_non_private() -> None:
    s = summarize([], wall_seconds=0.0)
    assert s["final_accuracy"] is None and s["best_accuracy"] is None
    assert s["compression_ratio"] is None and s["epsilon_spent"] is None
    assert s["bytes_wire_total"] == 0 and s["rounds_completed"] == 0
    s = summarize([{"round": 0, "accuracy": 0.3, "bytes_up": 10, "bytes_down": 10}], wall_seconds=1)
    assert s["epsilon_spent"] is None and s["final_accuracy"] == 0.3
    assert s["compression_ratio"] is None  # no fp32 reference reported


def test_summarize_counts_the_discarded_rounds() -> None:
    recs = [{**r, "applied": r["round"] != 1} if "bytes_up" in r else r for r in RECORDS]
    s = summarize(recs, wall_seconds=1.0)
    assert (s["rounds_completed"], s["rounds_applied"], s["rounds_discarded"]) == (4, 3, 1)
    none = summarize([{**r, "applied": False} for r in RECORDS], wall_seconds=1.0)
    assert (none["rounds_completed"], none["rounds_applied"], none["rounds_discarded"]) == (4, 0, 4)


def test_summarize_extra_cannot_override() -> None:
    with pytest.raises(ValueError, match="final_accuracy"):
        summarize(RECORDS, wall_seconds=1.0, extra={"final_accuracy": 1.0})


def test_cumulative_wire_bytes_and_log_axis_rule() -> None:
    assert cumulative_wire_bytes(RECORDS) == [500, 900, 1200, 1200, 1500]
    assert not use_log_x([500, 900, 1500])
    assert not use_log_x([0, 10, 1000])  # exactly two decades among positives
    assert use_log_x([0, 10, 1001])
    assert not use_log_x([])
