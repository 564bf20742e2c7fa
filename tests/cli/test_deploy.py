"""``fedq serve`` + ``fedq join`` as real processes on loopback, with TLS and per-client tokens,
each client with its own data file: the run completes, both ends count the same bytes, and the
server's metrics equal those of the equivalent ``fedq simulate`` (same selection, seeds, data).
Bad credentials are refused with the right status while the run goes on with the others."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FEDQ = Path(sys.executable).with_name("fedq")
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}

pytestmark = pytest.mark.skipif(not FEDQ.exists(), reason="the fedq entry point is not installed")


def _fedq(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FEDQ), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


class Server:
    """A ``fedq serve`` process on an ephemeral loopback port."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [str(FEDQ), "serve", *args, "--listen", "127.0.0.1:0"],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.match(r"listening on (\S+) ", line)
            if m:
                self.address = m.group(1)
                return
        raise AssertionError("fedq serve did not start:\n" + "".join(self.lines))

    def finish(self, timeout: float = 240) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        assert self.proc.returncode == 0, "".join(self.lines)
        return "".join(self.lines)


def _join(address: str, cid: str, data: str, certs: Path, cwd: Path, *extra: str) -> Any:
    args = [
        "join",
        "--server",
        address,
        "--client-id",
        cid,
        "--data",
        data,
        "--token-file",
        str(certs / "clients" / f"{cid}.token"),
        "--ca",
        str(certs / "ca.pem"),
        "--give-up-after",
        "30",
        *extra,
    ]
    return subprocess.Popen(
        [str(FEDQ), *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("certs") / "certs"
    done = _fedq("certs", str(d), "--clients", "3", cwd=d.parent)
    assert done.returncode == 0, done.stderr
    yield d


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "kind"),
    [("quickstart.yaml", "npz"), ("split_tiny.yaml", "csv")],
    ids=["federated", "split"],
)
def test_serve_and_three_joins_over_tls_match_simulate(
    certs: Path, tmp_path: Path, scenario: str, kind: str
) -> None:
    over = [
        "--set",
        "rounds.num_clients=3",
        "--set",
        "rounds.clients_per_round=3",
        "--set",
        "rounds.min_clients=3",
        "--set",
        "rounds.count=3",
    ]
    path = str(ROOT / "scenarios" / scenario)
    shard = _fedq("shard", path, *over, "--out", str(tmp_path / "data"), cwd=tmp_path)
    assert shard.returncode == 0, shard.stderr
    server = Server(
        [
            path,
            *over,
            "--tokens",
            str(certs / "tokens.yaml"),
            "--cert",
            str(certs / "server.pem"),
            "--key",
            str(certs / "server.key"),
            "--out",
            str(tmp_path / "served"),
        ],
        tmp_path,
    )
    joins = [
        _join(
            server.address,
            f"client-{i}",
            f"{kind}:{tmp_path / 'data'}/client-{i}.{kind}",
            certs,
            tmp_path,
        )
        for i in range(3)
    ]
    log = server.finish()
    outputs = [j.communicate(timeout=120)[0] for j in joins]
    assert all(j.returncode == 0 for j in joins), outputs
    assert "(TLS)" in log and "done: accuracy" in log
    # both ends counted the same bytes, per client
    summary = json.loads((tmp_path / "served" / "summary.json").read_text())
    for i, out in enumerate(outputs):
        assert "joined run" in out and "(TLS)" in out and "done: completed 3 rounds" in out
        found = re.search(r"up (\d+) B, down (\d+) B", out)
        assert found is not None, out
        up, down = int(found.group(1)), int(found.group(2))
        assert summary["clients"][f"client-{i}"] == {"bytes_up": up, "bytes_down": down} != {}
    # the deployment is the simulation: same selection, seeds and data -> same numbers
    sim = _fedq(
        "simulate",
        path,
        *over,
        "--set",
        "runtime.backend=inprocess",
        "--out",
        str(tmp_path / "sim"),
        "-q",
        cwd=tmp_path,
    )
    assert sim.returncode == 0, sim.stderr
    served, simulated = _records(tmp_path / "served"), _records(tmp_path / "sim")
    assert len(served) == len(simulated) == 3
    for a, b in zip(served, simulated, strict=True):
        for key in ("accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "mean_bits"):
            assert a[key] == b[key], (key, a[key], b[key])
    for name in ("config.json", "summary.json", "report.png", "checkpoint.pt"):
        assert (tmp_path / "served" / name).stat().st_size > 0, name
    if kind == "csv":
        assert (tmp_path / "served" / "bits.jsonl").stat().st_size > 0


@pytest.mark.slow
def test_bad_credentials_are_refused_and_the_run_goes_on(certs: Path, tmp_path: Path) -> None:
    """Under mutual TLS: a wrong token, an unknown client id and another client's certificate get
    UNAUTHENTICATED; a client without a certificate, one trusting another CA, and a plaintext
    client fail the TLS handshake (UNAVAILABLE). Two good clients complete the run meanwhile."""
    other = tmp_path / "other"
    assert _fedq("certs", str(other), "--clients", "1", cwd=tmp_path).returncode == 0
    (tmp_path / "wrong.token").write_text("not-the-token\n")
    os.chmod(tmp_path / "wrong.token", 0o600)
    over = [
        "--set",
        "rounds.num_clients=3",
        "--set",
        "rounds.clients_per_round=2",
        "--set",
        "rounds.min_clients=2",
        "--set",
        "rounds.count=2",
    ]
    path = str(ROOT / "scenarios" / "quickstart.yaml")
    assert _fedq("shard", path, *over, "--out", str(tmp_path / "d"), cwd=tmp_path).returncode == 0
    server = Server(
        [
            path,
            *over,
            "--tokens",
            str(certs / "tokens.yaml"),
            "--cert",
            str(certs / "server.pem"),
            "--key",
            str(certs / "server.key"),
            "--client-ca",
            str(certs / "ca.pem"),
            "--out",
            str(tmp_path / "run"),
        ],
        tmp_path,
    )
    a = server.address

    def mtls(cid: str) -> list[str]:
        return [
            "--cert",
            str(certs / "clients" / f"{cid}.pem"),
            "--key",
            str(certs / "clients" / f"{cid}.key"),
        ]

    data = f"npz:{tmp_path / 'd'}/client-2.npz"
    bad = {
        "wrong token": _join(
            a,
            "client-2",
            data,
            certs,
            tmp_path,
            *mtls("client-2"),
            "--token-file",
            str(tmp_path / "wrong.token"),
        ),
        "unknown id": _join(
            a,
            "client-9",
            data,
            certs,
            tmp_path,
            *mtls("client-2"),
            "--token-file",
            str(certs / "clients" / "client-2.token"),
        ),
        "someone else's cert": _join(a, "client-2", data, certs, tmp_path, *mtls("client-1")),
        "no client cert": _join(a, "client-2", data, certs, tmp_path),
        "other CA": _join(
            a, "client-2", data, certs, tmp_path, *mtls("client-2"), "--ca", str(other / "ca.pem")
        ),
        "plaintext": _join(a, "client-2", data, certs, tmp_path, "--insecure", "--ca", ""),
    }
    outcomes = {k: p.communicate(timeout=120)[0] for k, p in bad.items()}
    good = [
        _join(
            a,
            f"client-{i}",
            f"npz:{tmp_path / 'd'}/client-{i}.npz",
            certs,
            tmp_path,
            *mtls(f"client-{i}"),
        )
        for i in range(2)
    ]
    log = server.finish()
    assert all(g.communicate(timeout=120)[0] and g.returncode == 0 for g in good)
    for k in ("wrong token", "unknown id", "someone else's cert"):
        assert bad[k].returncode == 2 and "UNAUTHENTICATED" in outcomes[k], (k, outcomes[k])
        assert "not-the-token" not in outcomes[k] + log  # a token is never echoed
    for k in ("no client cert", "other CA", "plaintext"):
        assert bad[k].returncode == 2 and "UNAVAILABLE" in outcomes[k], (k, outcomes[k])
    assert "round 1: 2/2 updates" in log and "done: accuracy" in log


def test_serve_refuses_plaintext_off_loopback(certs: Path, tmp_path: Path) -> None:
    done = _fedq(
        "serve",
        str(ROOT / "scenarios" / "quickstart.yaml"),
        "--listen",
        "0.0.0.0:0",
        "--tokens",
        str(certs / "tokens.yaml"),
        "--set",
        "rounds.num_clients=3",
        "--set",
        "rounds.clients_per_round=3",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "refusing to listen on '0.0.0.0' without TLS" in done.stderr
    assert "Traceback" not in done.stderr
    # in the command's words (its flags, not Python arguments), before the run folder exists
    assert "--cert FILE and --key FILE" in done.stderr and "--insecure" in done.stderr
    assert "allow_insecure" not in done.stderr and "cert_file" not in done.stderr
    assert not (tmp_path / "r").exists()


def test_serve_checks_the_roster_against_the_scenario(certs: Path, tmp_path: Path) -> None:
    done = _fedq(
        "serve",
        str(ROOT / "scenarios" / "quickstart.yaml"),
        "--listen",
        "127.0.0.1:0",
        "--tokens",
        str(certs / "tokens.yaml"),
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert (
        "the tokens file lists 3 clients but the scenario has rounds.num_clients=10" in done.stderr
    )


def test_join_reports_an_unreachable_server_and_gives_up(certs: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    done = _fedq(
        "join",
        "--server",
        "127.0.0.1:1",
        "--client-id",
        "client-0",
        "--token-file",
        str(certs / "clients" / "client-0.token"),
        "--data",
        "digits",
        "--give-up-after",
        "2",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "UNAVAILABLE" in done.stderr
    assert "gave up after 2 s" in done.stderr
    assert time.monotonic() - t0 < 60


def test_join_names_a_server_without_the_rounds_service(certs: Path, tmp_path: Path) -> None:
    """A server of round protocol 2 (or not fedq) has no fedq.v2.Rounds: the site stops at once,
    saying which service and protocol it needs, instead of gRPC's bare UNIMPLEMENTED."""
    from concurrent import futures

    import grpc

    bare = grpc.server(futures.ThreadPoolExecutor(1))
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        done = _fedq(
            "join",
            "--server",
            f"127.0.0.1:{port}",
            "--client-id",
            "client-0",
            "--token-file",
            str(certs / "clients" / "client-0.token"),
            "--data",
            "digits",
            "--give-up-after",
            "30",
            cwd=tmp_path,
        )
    finally:
        bare.stop(0)
    assert done.returncode == 2, done.stderr
    assert "does not serve fedq.v2.Rounds" in done.stderr, done.stderr
    assert "round protocol 3" in done.stderr and "gave up" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_join_on_a_site_without_the_gpu_it_asks_for_fails_before_joining(
    certs: Path, tmp_path: Path
) -> None:
    done = _fedq(
        "join",
        "--server",
        "127.0.0.1:1",
        "--client-id",
        "client-0",
        "--device",
        "cuda",
        "--token-file",
        str(certs / "clients" / "client-0.token"),
        "--data",
        "digits",
        "--give-up-after",
        "30",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "sees no CUDA GPU" in done.stderr, done.stderr
    assert "UNAVAILABLE" not in done.stderr  # it never tried the server
