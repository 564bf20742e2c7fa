"""``fedq bench base`` from the real CLI, on a tiny local causal LM: each arm runs in its own
process, seeds pair the arms (the same base perplexity for the fp32 arms, the same data), packed
arms hold fewer bytes of base weights, and the JSON has the per-seed rows and per-arm means."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_base_cli_runs_each_arm_in_its_own_process(tmp_path: Path, tiny_lm: Path) -> None:
    out = tmp_path / "base.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "fedq.cli", "bench", "base", "--model", f"hf:{tiny_lm}"),
            *("--arms", "fp32", "4-bit/gc", "2.75-avg"),
            *("--seeds", "3", "--num-samples", "24", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "4-bit/gc", "2.75-avg"]
    fp32, four, budget = rows.values()
    assert four["gradient_checkpointing"] and not budget["gradient_checkpointing"]
    assert fp32["steps"] == four["steps"] == budget["steps"] > 0
    assert (fp32["packed_layers"], four["packed_layers"], budget["packed_layers"]) == (0, 14, 14)
    assert four["base_linear_mib"] < 0.3 * fp32["base_linear_mib"]
    # a budget of 2.75 bits per weight, scales included, holds (the bits of every weight packed)
    assert budget["base_linear_mib"] <= 2.75 / 32 * fp32["base_linear_mib"] * 1.0001
    for r in rows.values():
        assert r["peak_rss_mib"] >= max(r["load_peak_mib"], r["train_peak_mib"]) > 0
        assert r["perplexity_after"] > 1 and r["seconds_per_step"] > 0
    arms = result["arms"]
    assert arms["fp32"]["peak_vs_fp32"] == 1.0
    assert arms["4-bit/gc"]["perplexity_vs_fp32"] is not None
    assert result["fp32_seed_spread"] == 0.0  # one seed: no spread to report
    assert "goal (4-bit/gc: peak memory <= 0.35x of fp32's, perplexity within 3%)" in done.stdout
