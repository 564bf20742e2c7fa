"""Faults, from the CLI as processes: a killed ``fedq join`` and a stalled one are dropped (the
round completes with the rest, the next proceeds); a killed ``fedq serve`` restarted with
``--resume`` gets its clients back (they reconnect with backoff) and the run completes with the
privacy spent never lower than before the crash."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FEDQ = Path(sys.executable).with_name("fedq")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}  # fmt: skip
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FEDQ.exists(), reason="fedq entry point not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _wait(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def _setup(tmp: Path, over: list[str]) -> tuple[Path, str]:
    scenario = str(ROOT / "scenarios" / "quickstart.yaml")
    for args in (["certs", str(tmp / "certs"), "--clients", "3"],
                 ["shard", scenario, *over, "--out", str(tmp / "data")]):  # fmt: skip
        done = subprocess.run([str(FEDQ), *args], env=ENV, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
    return tmp / "certs", scenario


def _serve(scenario: str, over: list[str], port: int, certs: Path, out: Path,
           *extra: str) -> subprocess.Popen[str]:  # fmt: skip
    return subprocess.Popen(
        [str(FEDQ), "serve", *([scenario] if scenario else []), *over,
         "--listen", f"127.0.0.1:{port}",
         "--tokens", str(certs / "tokens.yaml"), "--cert", str(certs / "server.pem"),
         "--key", str(certs / "server.key"), "--out", str(out), *extra],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _join(i: int, port: int, certs: Path, tmp: Path) -> subprocess.Popen[str]:
    cid = f"client-{i}"
    return subprocess.Popen(
        [str(FEDQ), "join", "--server", f"127.0.0.1:{port}", "--client-id", cid,
         "--token-file", str(certs / "clients" / f"{cid}.token"), "--ca", str(certs / "ca.pem"),
         "--data", f"npz:{tmp / 'data'}/{cid}.npz", "--give-up-after", "120"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_a_killed_and_a_stalled_client_are_dropped_and_the_run_goes_on(tmp_path: Path) -> None:
    rounds = 30  # quick rounds; the faults come once all three clients have taken part in one
    over = ["--set", "fed.num_clients=3", "--set", "fed.clients_per_round=3",
            "--set", "fed.min_clients=1", "--set", f"fed.rounds={rounds}",
            "--set", "fed.round_timeout_s=6"]  # fmt: skip
    certs, scenario = _setup(tmp_path, over)
    port, out = _free_port(), tmp_path / "run"
    server = _serve(scenario, over, port, certs, out)
    joins = [_join(i, port, certs, tmp_path) for i in range(3)]
    try:
        _wait(lambda: any(len(r["updated"]) == 3 for r in _records(out)), 180, "a full round")
        joins[0].send_signal(signal.SIGKILL)  # dies: its work stream closes at once
        joins[1].send_signal(signal.SIGSTOP)  # hangs: its connection stays open, silent
        _wait(lambda: any("client-1" in r["dropped"] for r in _records(out)), 60,
              "client-1 dropped")  # fmt: skip
        joins[1].send_signal(signal.SIGCONT)  # back: it takes part again (or is told it is late)
        log, _ = server.communicate(timeout=180)
        late, _ = joins[1].communicate(timeout=60)
    finally:
        for j in joins:
            if j.poll() is None:
                j.send_signal(signal.SIGCONT)
                j.kill()
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, log
    recs = _records(out)
    assert [r["round"] for r in recs] == list(range(rounds))
    full = next(r["round"] for r in recs if len(r["updated"]) == 3)
    assert all(r["applied"] and "client-2" in r["updated"] for r in recs[full:])  # the rest go on
    hit = next(r for r in recs if "client-1" in r["dropped"])
    assert "deadline" in hit["dropped"]["client-1"]  # the silent one: at the deadline
    assert all("client-0" not in r["updated"] for r in recs[hit["round"] :])  # the dead one
    assert any("client-1" in r["updated"] for r in recs[hit["round"] :])  # the stalled one is back
    gone = [r["dropped"]["client-0"] for r in recs if "client-0" in r["dropped"]]
    assert all(why == "its work stream closed" for why in gone), gone  # dropped at once
    assert joins[1].returncode == 0 and f"done: completed {rounds} rounds" in late, late


def test_a_killed_server_resumes_and_its_clients_come_back(tmp_path: Path) -> None:
    over = ["--set", "fed.num_clients=3", "--set", "fed.clients_per_round=3",
            "--set", "fed.min_clients=3", "--set", "fed.rounds=6",
            "--set", "train.local_epochs=4",
            "--set", "privacy.mechanism=central", "--set", "privacy.noise_multiplier=2.0",
            "--set", "privacy.clip_norm=5.0"]  # fmt: skip
    certs, scenario = _setup(tmp_path, over)
    port, out = _free_port(), tmp_path / "run"
    server = _serve(scenario, over, port, certs, out)
    joins = [_join(i, port, certs, tmp_path) for i in range(3)]
    try:
        _wait(lambda: len(_records(out)) >= 2, 240, "two rounds")
        before = max(r["epsilon"] for r in _records(out))
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        done_before = len(_records(out))
        time.sleep(2.0)  # the clients notice and back off
        server = _serve("", [], port, certs, out, "--resume", str(out))  # its config.json
        log, _ = server.communicate(timeout=300)
        outs = [j.communicate(timeout=120)[0] for j in joins]
    finally:
        for p in [server, *joins]:
            if p.poll() is None:
                p.kill()
    assert server.returncode == 0, log
    assert "resuming at round" in log
    assert all(j.returncode == 0 for j in joins), outs
    assert all("reconnecting" in o and "done: completed 6 rounds" in o for o in outs), outs
    recs = _records(out)
    assert [r["round"] for r in recs] == list(range(6)) and len(recs) >= done_before
    eps = [r["epsilon"] for r in recs]
    assert eps == sorted(eps) and eps[-1] >= before > 0  # never reset, never lower
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 6 and summary["epsilon_spent"] >= before
