"""``fedq bench faults`` from the real CLI, small: each fault lands in the round it aims at and is
handled the documented way (the dead client dropped as its stream closes, the stalled one at the
deadline, the restarted server resuming the round it lost), and no process of the bench is left.
Times are only printed; what is checked here holds whatever the machine's load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow


def test_bench_faults_cli_hits_each_fault_and_cleans_up(tmp_path: Path) -> None:
    out, keep = tmp_path / "faults.json", tmp_path / "work"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedq.cli",
            "bench",
            "faults",
            "--rounds",
            "1",
            "--epochs",
            "10",
            "--round-timeout",
            "15",
            "--keep",
            str(keep),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("dead client", "stalled client", "server restart", "cold start"):
        assert line in done.stdout, done.stdout
    result = json.loads(out.read_text())
    dead, stalled, restart = (
        result[k] for k in ("dead_client", "stalled_client", "server_restart")
    )
    assert dead["dropped_because"] == "its work stream closed"
    assert dead["applied"] and dead["clients_ok"] == 2  # closed with the other two
    assert dead["ratio_to_normal_round"] == dead["fault_to_close_s"] / dead["normal_round_s"]
    assert stalled["dropped_because"] == "no update before the deadline (15 s)"
    assert stalled["fault_round_s"] >= stalled["deadline_s"] == 15  # closed at the deadline
    assert stalled["applied"] and stalled["clients_ok"] == 2
    assert restart["restart_to_listening_s"] <= restart["restart_to_first_round_s"]
    assert restart["restart_to_all_clients_s"] <= restart["restart_to_first_round_s"]
    recs = [json.loads(x) for x in (keep / "restart" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == list(range(len(recs))) and len(recs) > restart["round"]
    server_log = (keep / "logs" / "restart-resumed-server.log").read_text()
    assert f"resuming at round {restart['round']}" in server_log
    left = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(keep) in " ".join(p.info["cmdline"] or [])
    ]
    assert not left, [p.info["cmdline"] for p in left]
