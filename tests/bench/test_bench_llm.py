"""``fedq bench llm`` from the real CLI, on a tiny local causal LM: every arm and seed runs (both
modes), the base perplexity is the same for every arm of a seed (paired), fewer bits send fewer
bytes, and the JSON holds the per-seed rows and the per-arm means."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_llm_cli_runs_each_arm_paired_by_seed(tmp_path: Path, tiny_lm: Path) -> None:
    out = tmp_path / "llm.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "fedq.cli", "bench", "llm", "--model", f"hf:{tiny_lm}"),
            *("--num-samples", "40", "--rounds", "1", "--seeds", "3"),
            *("--arms", "fp32", "4-bit", "split-fp32", "split-amaq"),
            *("--cut", "1", "--workers", "2", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    arms = ["fp32", "4-bit", "split-fp32", "split-amaq"]
    assert [(r["seed"], r["arm"]) for r in rows] == [(3, a) for a in arms]
    a, b, sa, sb = rows
    # paired: same base, same data and holdout, in both modes
    assert a["perplexity_before"] == b["perplexity_before"] == sa["perplexity_before"]
    assert b["bytes_per_round"] < a["bytes_per_round"] / 3
    assert a["peak_rss_client_gib"] > 0
    four = result["arms"]["4-bit"]
    assert four["fewer_bytes_than_fp32"] > 3 and four["perplexity_vs_fp32"] is not None
    assert result["fp32_seed_spread"] == 0.0  # one seed: no spread to report
    assert "perplexity gain over the base" in done.stdout
    # split arms against split-fp32: AMAQ at the cut sends fewer bytes than fp32 activations
    amaq = result["arms"]["split-amaq"]
    assert sa["perplexity_after"] > 1 and sb["perplexity_after"] > 1
    assert amaq["fewer_bytes_than_fp32"] == sa["bytes_per_round"] / sb["bytes_per_round"] > 2
    assert "perplexity gain over the base (split-fp32)" in done.stdout
