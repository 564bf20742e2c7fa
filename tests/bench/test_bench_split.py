"""``fedq bench split --frontier`` from the real CLI on the tiny BERT: fixed widths (a fractional
one as a mixed map), AMAQ given a fixed run's bytes of the same seed and spending them, the paired
comparison printed, the plot and the JSON written to ``--out``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = [
    *("--set", "model.name=tiny_bert_lora", "--set", "model.hidden=32"),
    *("--set", "model.lora_r=4", "--set", "model.max_length=24", "--set", "train.batch_size=8"),
    *("--set", "split.tiny_layers=4", "--set", "split.cut=2"),
    *("--set", "runtime.threads_per_worker=1"),
]


def test_bench_split_frontier_cli(tmp_path: Path) -> None:
    steps = 12
    done = subprocess.run(
        [
            *(sys.executable, "-m", "fedq.cli", "bench", "split", "--frontier", "minilm"),
            *("--widths", "1.5,2", "--budgets", "2", "--steps", str(steps), "--local-steps", "6"),
            *("--seeds", "1", "--max-train", "64", "--max-test", "32", "--jobs", "2"),
            *(
                "--amaq-arm",
                "amaq:",
                "--amaq-arm",
                "flat:split.warmup_fraction=0,split.init_bits=2",
            ),
            *("--out", str(tmp_path / "fr"), *TINY),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "fr" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "fr" / "frontier.json").read_text())
    arms = result["arms"]
    assert set(arms) == {"fp32", "fixed 1.5", "fixed 2", "amaq @2", "amaq flat @2"}
    assert arms["fixed 1.5"]["bits_run"] == pytest.approx(1.5, abs=0.02)
    assert arms["fixed 1.5"]["mib"] < arms["fixed 2"]["mib"] < arms["fp32"]["mib"] / 8
    for arm in ("amaq @2", "amaq flat @2"):
        goal = result["goals"][arm]
        # the budget is spent to within one step of the fixed run's bytes, as the server counts
        assert all(abs(p) < 100 / steps for p in goal["bytes_vs_fixed_pct"]), goal
        assert goal["ledger_vs_transport_pct"] == [0.0]
        assert len(goal["diff"]) == 1 and goal["judged"] in (True, False)
    assert "AMAQ against fixed bits at the same bytes (paired by seed)" in done.stdout
