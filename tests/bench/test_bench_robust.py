"""``fedq bench robust`` from the real CLI, small (``--quick``: 3 rounds, 2 sign-flipping
attackers of 10): the table and the JSON, and the robust aggregator holding where the mean
falls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_robust_quick_cli(tmp_path: Path) -> None:
    out = tmp_path / "robust.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedq.cli",
            "bench",
            "robust",
            "--quick",
            "--aggregators",
            "mean",
            "median",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "sign_flipx2" in done.stdout and "ratio to the clean mean run" in done.stdout
    result = json.loads(out.read_text())
    assert result["rounds"] == 3 and set(result["clean"]) == {"mean", "median"}
    rows = {r["aggregator"]: r for r in result["rows"]}
    assert set(rows) == {"mean", "median"}
    assert all(r["attack"] == "sign_flip" and r["attackers"] == 2 for r in rows.values())
    assert rows["mean"]["accuracy"] < 0.5 * result["clean"]["mean"]  # the attack bites the mean
    assert rows["median"]["accuracy"] > 0.7 * result["clean"]["mean"]  # and not the median
    assert rows["mean"]["refused"] == rows["median"]["refused"] == 0  # within the bounds
