"""Run outcomes, from the CLI as processes: a run in which no round was applied says so (the
``done:`` line, ``summary.json``'s counts and ``stopped_reason``) and exits with status 3, in
federated and in split mode (where the discarded rounds also leave the server's half as it was);
a served run killed before its first round resumes from its folder, with the same run id, so a
site that joined before the kill carries on in it."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from fedq.bench.procs import CliProcess, run_cli

ROOT = Path(__file__).resolve().parents[2]


def _records(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_a_split_run_with_every_round_discarded_says_so_and_fails(
    fedq_cli: Any, tmp_path: Path
) -> None:
    """A learning rate of 1e38 makes each client's next step overflow after the server's top
    took a step from it at that rate, so every client fails and every round is discarded.
    Rolled back, the top evaluates to the same finite loss after each round (kept, it is NaN)."""
    out = tmp_path / "run"
    done = fedq_cli(
        "simulate",
        str(ROOT / "scenarios" / "split_tiny.yaml"),
        "--set",
        "train.lr=1.0e+38",
        "--set",
        "train.optimizer=sgd",
        "--set",
        "rounds.count=2",
        "--out",
        str(out),
        "-q",
        timeout=300,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "| 2 rounds, 0 applied (2 discarded) |" in done.stdout
    recs = _records(out)
    assert [r["applied"] for r in recs] == [False, False]
    assert recs[0]["loss"] is not None and math.isfinite(recs[0]["loss"])
    assert [(r["accuracy"], r["loss"]) for r in recs] == [
        (recs[0]["accuracy"], recs[0]["loss"])
    ] * 2
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["rounds_completed"],
        summary["rounds_applied"],
        summary["rounds_discarded"],
    ) == (2, 0, 2)
    assert summary["stopped_reason"].startswith("no round was applied: 2 rounds discarded")
    assert summary["stopped_reason"] in done.stdout


def test_a_federated_run_with_every_round_discarded_fails(fedq_cli: Any, tmp_path: Path) -> None:
    """Every client's training overflows (learning rate 1e38), so none delivers an update."""
    out = tmp_path / "run"
    done = fedq_cli(
        "simulate",
        str(ROOT / "scenarios" / "quickstart.yaml"),
        "--set",
        "train.lr=1.0e+38",
        "--set",
        "rounds.count=2",
        "--set",
        "rounds.num_clients=2",
        "--set",
        "rounds.clients_per_round=2",
        "--set",
        "runtime.backend=inprocess",
        "--set",
        "runtime.workers=1",
        "--out",
        str(out),
        "-q",
        timeout=300,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "| 2 rounds, 0 applied (2 discarded) |" in done.stdout
    why = "no round was applied: 2 rounds discarded, each with fewer than rounds.min_clients=1"
    assert why in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_applied"] == 0 and summary["final_accuracy"] is not None


def test_a_client_task_that_raises_fails_its_round_and_the_worker_carries_on(
    fedq_cli: Any, tmp_path: Path
) -> None:
    """A learning rate of 1e300 does not fit a float32 parameter: torch's SGD step raises a
    RuntimeError (no fedq error). Each client reports its task as failed with that reason, the
    worker takes the next round, and the run ends with every round discarded, not a dead worker
    and a traceback."""
    out = tmp_path / "run"
    done = fedq_cli(
        "simulate",
        str(ROOT / "scenarios" / "quickstart.yaml"),
        "--set",
        "train.lr=1.0e+300",
        "--set",
        "rounds.count=2",
        "--set",
        "rounds.num_clients=2",
        "--set",
        "rounds.clients_per_round=2",
        "--set",
        "runtime.backend=inprocess",
        "--set",
        "runtime.workers=1",
        "--out",
        str(out),
        "-q",
        timeout=300,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "| 2 rounds, 0 applied (2 discarded) |" in done.stdout
    assert "Traceback" not in done.stderr and "died" not in done.stderr, done.stderr
    why = "the client failed: RuntimeError: value cannot be converted to type float"
    recs = _records(out)
    assert [r["applied"] for r in recs] == [False, False]
    for r in recs:
        assert sorted(r["dropped"]) == ["client-0", "client-1"]
        assert all(d.startswith(why) for d in r["dropped"].values()), r["dropped"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_served_run_killed_before_its_first_round_resumes(tmp_path: Path) -> None:
    """``fedq serve`` waits for its second client and is killed: its folder has a checkpoint of
    round 0 from the start, ``--resume`` serves the same run (same run id), client-0, which
    joined before the kill, reconnects and carries on, and the run completes."""
    scenario = str(ROOT / "scenarios" / "quickstart.yaml")
    over = [
        "--set",
        "rounds.num_clients=2",
        "--set",
        "rounds.clients_per_round=2",
        "--set",
        "rounds.min_clients=2",
        "--set",
        "rounds.count=2",
    ]
    certs = tmp_path / "certs"
    run_cli(["certs", str(certs), "--clients", "2"], tmp_path, 120)
    run_cli(["shard", scenario, *over, "--out", str(tmp_path / "data")], tmp_path, 120)
    port, out = _free_port(), tmp_path / "run"
    serve = [
        "--listen",
        f"127.0.0.1:{port}",
        "--tokens",
        str(certs / "tokens.yaml"),
        "--cert",
        str(certs / "server.pem"),
        "--key",
        str(certs / "server.key"),
    ]

    def join(i: int) -> CliProcess:
        cid = f"client-{i}"
        return CliProcess(
            cid,
            [
                "join",
                "--server",
                f"127.0.0.1:{port}",
                "--client-id",
                cid,
                "--token-file",
                str(certs / "clients" / f"{cid}.token"),
                "--ca",
                str(certs / "ca.pem"),
                "--give-up-after",
                "120",
                "--data",
                f"npz:{tmp_path / 'data'}/{cid}.npz",
            ],
            tmp_path,
            timeout=180,
        )

    procs: list[CliProcess] = []
    try:
        first = CliProcess(
            "server", ["serve", scenario, *over, *serve, "--out", str(out)], tmp_path, timeout=180
        )
        procs.append(first)
        _, line = first.wait_line(r"^listening on ")
        run_id = re.search(r", run (\S+),", line)
        assert run_id is not None, line
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ckpt["next_round"] == 0 and ckpt["server"]["run_id"] == run_id[1]
        procs.append(join(0))
        procs[-1].wait_for(r"^joined run ")
        first.wait_for(r"^clients available \(1\)")  # the round waits for client-1
        first.signal(signal.SIGKILL)
        first.end(30)
        assert _records(out) == []
        second = CliProcess(
            "server again", ["serve", "--resume", str(out), *serve], tmp_path, timeout=180
        )
        procs.append(second)
        _, line = second.wait_line(r"^listening on ")
        assert f", run {run_id[1]}," in line and "resuming" not in line
        procs.append(join(1))
        assert second.end(180) == 0, second.log()
        for p in procs[1:2] + procs[3:]:
            assert p.end(60) == 0, p.log()
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.end(10)
    assert "reconnecting" in procs[1].log() and "done: completed 2 rounds" in procs[1].log()
    assert "| 2 rounds, 2 applied |" in second.log()
    recs = _records(out)
    assert [(r["round"], r["applied"]) for r in recs] == [(0, True), (1, True)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == run_id[1] and summary["rounds_applied"] == 2
    assert summary["stopped_reason"] is None
