"""Faults, from the CLI as processes: a killed ``fedq join`` and a stalled one are dropped (the
round completes with the rest, the next proceeds); a killed ``fedq serve`` restarted with
``--resume`` gets its clients back (they reconnect with backoff) and the run completes with the
privacy spent never lower than before the crash."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedq.bench.procs import CliProcess

ROOT = Path(__file__).resolve().parents[2]
FEDQ = Path(sys.executable).with_name("fedq")
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}
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


def _setup(
    tmp: Path, over: list[str], name: str = "quickstart.yaml", clients: int = 3
) -> tuple[Path, str]:
    scenario = str(ROOT / "scenarios" / name)
    for args in (
        ["certs", str(tmp / "certs"), "--clients", str(clients)],
        ["shard", scenario, *over, "--out", str(tmp / "data")],
    ):
        done = subprocess.run(
            [str(FEDQ), *args], env=ENV, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    return tmp / "certs", scenario


def _serve(
    scenario: str, over: list[str], port: int, certs: Path, out: Path, *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(FEDQ),
            "serve",
            *([scenario] if scenario else []),
            *over,
            "--listen",
            f"127.0.0.1:{port}",
            "--tokens",
            str(certs / "tokens.yaml"),
            "--cert",
            str(certs / "server.pem"),
            "--key",
            str(certs / "server.key"),
            "--out",
            str(out),
            *extra,
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _listening(server: subprocess.Popen[str]) -> str:
    """Read ``fedq serve``'s output up to its "listening on" line; returns what was read."""
    assert server.stdout is not None
    head = ""
    for line in server.stdout:
        head += line
        if line.startswith("listening on "):
            return head
    raise AssertionError("fedq serve did not start:\n" + head)


def _join(
    i: int, port: int, certs: Path, tmp: Path, data: str | None = None, log: Path | None = None
) -> subprocess.Popen[str]:
    """``fedq join`` as client-``i`` with ``data`` (default: its shard); its output in a pipe,
    or in the file ``log`` (readable while it runs)."""
    cid = f"client-{i}"
    return subprocess.Popen(
        [
            str(FEDQ),
            "join",
            "--server",
            f"127.0.0.1:{port}",
            "--client-id",
            cid,
            "--token-file",
            str(certs / "clients" / f"{cid}.token"),
            "--ca",
            str(certs / "ca.pem"),
            "--data",
            data or f"npz:{tmp / 'data'}/{cid}.npz",
            "--give-up-after",
            "120",
        ],
        env=ENV,
        stdout=subprocess.PIPE if log is None else log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def _held_round(server: CliProcess, done: set[int]) -> int:
    """The round client-0 holds a task of while it is stopped: the first one ``fedq -v serve``
    logs as opened with client-0 selected that client-0 has not said it finished (``done``)."""
    after = 0.0
    while True:
        t, line = server.wait_line(r"fedq\.rounds\.engine: round \d+: .*client-0", after=after)
        r = int(line.split("fedq.rounds.engine: round ", 1)[1].split(":", 1)[0])
        if r not in done:
            return r
        after = t


def test_a_killed_and_a_stalled_client_are_dropped_and_the_run_goes_on(tmp_path: Path) -> None:
    """client-0 dies holding a task (stopped, then killed once the round it holds is known): it
    is dropped from that round as its stream closes, not at the deadline. client-1 hangs: it is
    dropped at the deadline. The rounds go on with the others, client-1 again once it is
    continued; client-0 never again."""
    rounds = 40  # quick rounds; the faults come once all three clients have taken part in one
    over = [
        "--set",
        "rounds.num_clients=3",
        "--set",
        "rounds.clients_per_round=3",
        "--set",
        "rounds.min_clients=1",
        "--set",
        f"rounds.count={rounds}",
        "--set",
        "rounds.timeout_s=6",
    ]
    certs, scenario = _setup(tmp_path, over)
    port, out = _free_port(), tmp_path / "run"
    server = CliProcess(
        "server",
        [
            "-v",
            "serve",
            scenario,
            *over,
            "--listen",
            f"127.0.0.1:{port}",
            "--tokens",
            str(certs / "tokens.yaml"),
            "--cert",
            str(certs / "server.pem"),
            "--key",
            str(certs / "server.key"),
            "--out",
            str(out),
        ],
        tmp_path,
        timeout=180,
    )
    logs = [tmp_path / f"client-{i}.log" for i in range(3)]
    joins: list[subprocess.Popen[str]] = []
    try:
        server.wait_for(r"^listening on ")  # the joins register at once: none backs off
        joins = [_join(i, port, certs, tmp_path, log=logs[i]) for i in range(3)]
        _wait(lambda: any(len(r["updated"]) == 3 for r in _records(out)), 180, "a full round")
        joins[0].send_signal(signal.SIGSTOP)
        done = {int(x) for x in re.findall(r"^round (\d+): done", logs[0].read_text(), re.M)}
        held = _held_round(server, done)
        joins[1].send_signal(signal.SIGSTOP)  # hangs: its connection stays open, silent
        joins[0].send_signal(signal.SIGKILL)  # dies holding its task: its stream closes at once
        _wait(
            lambda: any("client-1" in r["dropped"] for r in _records(out)), 60, "client-1 dropped"
        )
        joins[1].send_signal(signal.SIGCONT)  # back: it takes part again (or is told it is late)
        assert server.end(180) == 0, server.log()
        assert joins[1].wait(60) == 0, logs[1].read_text()
    finally:
        for j in joins:
            if j.poll() is None:
                j.send_signal(signal.SIGCONT)
                j.kill()
        server.end(10)
    recs = _records(out)
    assert [r["round"] for r in recs] == list(range(rounds))
    full = next(r["round"] for r in recs if len(r["updated"]) == 3)
    assert all(r["applied"] and "client-2" in r["updated"] for r in recs[full:])  # the rest go on
    assert recs[held]["dropped"].get("client-0") == "its work stream closed", recs[held]
    assert all("client-0" not in r["updated"] for r in recs[held:])  # never again
    hit = next(r for r in recs if "client-1" in r["dropped"])
    assert hit["round"] >= held and "deadline" in hit["dropped"]["client-1"]
    assert any("client-1" in r["updated"] for r in recs[hit["round"] :])  # the stalled one is back
    assert f"done: completed {rounds} rounds" in logs[1].read_text()


def test_a_killed_server_resumes_and_its_clients_come_back(tmp_path: Path) -> None:
    over = [
        "--set",
        "rounds.num_clients=3",
        "--set",
        "rounds.clients_per_round=3",
        "--set",
        "rounds.min_clients=3",
        "--set",
        "rounds.count=6",
        "--set",
        "train.local_epochs=4",
        "--set",
        "privacy.mechanism=central",
        "--set",
        "privacy.noise_multiplier=2.0",
        "--set",
        "privacy.clip_norm=5.0",
    ]
    certs, scenario = _setup(tmp_path, over)
    port, out = _free_port(), tmp_path / "run"
    server = _serve(scenario, over, port, certs, out)
    _listening(server)  # the joins register at once: none is left behind backing off
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


def _steps(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "bits.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # all but the timing


def _served(
    tmp: Path,
    certs: Path,
    scenario: str,
    over: list[str],
    data: list[str],
    name: str,
    kill_in: int | None,
) -> tuple[Path, str, list[str]]:
    """A served run with two joins (client-``i`` with ``data[i]``). With ``kill_in`` the server
    is SIGKILLed once client-0 finished round ``kill_in`` (client-1 still works on it) and
    started again with ``--resume``. Returns the run folder, the (last) server's output and the
    joins'."""
    port, out = _free_port(), tmp / name
    logs = [tmp / f"{name}-join-{i}.log" for i in range(2)]
    server = _serve(scenario, over, port, certs, out)
    head = _listening(server)  # the joins start without backing off
    joins = [_join(i, port, certs, tmp, data[i], logs[i]) for i in range(2)]
    try:
        if kill_in is not None:
            done = f"round {kill_in}: done"
            _wait(lambda: done in logs[0].read_text(), 300, f"client-0 in round {kill_in}")
            server.send_signal(signal.SIGKILL)
            server.wait(30)
            assert len(_records(out)) == kill_in  # the round is open: client-1 is still in it
            server, head = _serve("", [], port, certs, out, "--resume", str(out)), ""
        log, _ = server.communicate(timeout=300)
        for j in joins:
            j.wait(120)
    finally:
        for p in [server, *joins]:
            if p.poll() is None:
                p.kill()
    assert server.returncode == 0, head + log
    outs = [x.read_text() for x in logs]
    assert all(j.returncode == 0 for j in joins), outs
    return out, head + log, outs


@pytest.mark.parametrize("mode", ["federated", "split"])
def test_a_killed_server_resumes_to_the_uninterrupted_result(tmp_path: Path, mode: str) -> None:
    """The server is killed in a round that client-0 has finished and client-1 has not: in split
    mode client-1 is taking its turn; in federated mode it trains on the whole training split,
    ten times client-0's data. Started again with ``--resume``, the server runs the round again
    from its start (the checkpoint's state; each client re-runs its task from the state it had
    before it, client-0 too) and the run ends as an uninterrupted one: every round's model and
    losses, every split step, the bit maps and the bytes each client sent. One exception: a
    federated client-1 that finishes its round after the server came back uploads it before it
    learns of the restart; the upload is refused (the round is not open yet) but its bytes
    crossed the wire, and they count."""
    over = [
        "--set",
        "rounds.num_clients=2",
        "--set",
        "rounds.clients_per_round=2",
        "--set",
        "rounds.min_clients=2",
        "--set",
        "rounds.count=4",
    ]
    if mode == "split":
        over += ["--set", "split.local_steps=16"]
        certs, scenario = _setup(tmp_path, over, "split_tiny.yaml", clients=2)
        data = [f"csv:{tmp_path / 'data'}/client-{i}.csv" for i in range(2)]
    else:
        over += ["--set", "train.local_epochs=8"]
        shards = ["--set", "rounds.num_clients=10", "--set", "data.partition=iid"]
        certs, scenario = _setup(tmp_path, shards, "quickstart.yaml", clients=2)
        data = [f"npz:{tmp_path / 'data'}/client-0.npz", "digits"]
    full, _, outs = _served(tmp_path, certs, scenario, over, data, "full", None)
    assert all("done: completed 4 rounds" in o for o in outs), outs
    killed, log, outs = _served(tmp_path, certs, scenario, over, data, "killed", 2)
    assert "resuming at round 2" in log
    assert all("reconnecting" in o and "done: completed 4 rounds" in o for o in outs), outs
    assert outs[0].count("round 2: done") == 2  # client-0 ran round 2 twice
    a, b = _records(full), _records(killed)
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    for key in (
        "updated",
        "train_loss",
        "accuracy",
        "loss",
        "bytes_down",
        "mean_bits",
        "bits/cut/act/mean",
        "bits/cut/grad/mean",
    ):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    assert sa["final_accuracy"] == sb["final_accuracy"]
    up_a, up_b = [r["bytes_up"] for r in a], [r["bytes_up"] for r in b]
    if mode == "split":  # client-1 learns of the restart at its next step: nothing late
        assert up_a == up_b and sa["clients"] == sb["clients"]
        assert _steps(full) == _steps(killed)
        maps = [json.loads((d / "bit_maps.json").read_text()) for d in (full, killed)]
        assert maps[0] == maps[1]
    else:
        assert up_b[:2] == up_a[:2] and up_b[3:] == up_a[3:] and up_b[2] >= up_a[2]
        assert sb["clients"]["client-0"] == sa["clients"]["client-0"]
        late = up_b[2] - up_a[2]
        assert sb["clients"]["client-1"]["bytes_up"] == sa["clients"]["client-1"]["bytes_up"] + late
