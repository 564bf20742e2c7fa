"""``fedq bench scale`` from the real CLI, tiny: every size runs in its own process with the same
work per round, and the JSON has its rounds, memory and checkpoint bytes, with ratios to the
smallest size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fedq.bench.scale import num_samples_for


def test_bench_scale_cli_runs_every_size(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    env = {**os.environ, "FEDQ_CACHE": str(tmp_path / "cache")}  # this subprocess only
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedq.cli",
            "bench",
            "scale",
            "--clients",
            "40,20",
            "--per-round",
            "4",
            "--rounds",
            "2",
            "--backend",
            "inprocess",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "s/round" in done.stdout and "peak RSS" in done.stdout
    result = json.loads(out.read_text())
    sizes = result["sizes"]
    assert [s["clients"] for s in sizes] == [20, 40]  # smallest first: the baseline
    assert sizes[0]["seconds_ratio"] == sizes[0]["rss_ratio"] == 1.0
    for s in sizes:
        assert s["rounds"] == 2 and len(s["round_seconds"]) == 2
        assert s["clients_per_round"] == 4
        assert s["peak_rss_gib"] > 0.1 and 0 < s["peak_pss_gib"] <= s["peak_rss_gib"]
        assert len(s["checkpoint_written"]) == 2 and min(s["checkpoint_written"]) > 0
        assert s["checkpoint_bytes"] > 0
    assert "memory_goal_met" not in result  # judged for 10,000 clients only
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == ["mnist1d-seed42-n1000.npz", "mnist1d-seed42-n500.npz"]
    assert num_samples_for(10_000, 20) == 250_000 and num_samples_for(3, 20) == 80
