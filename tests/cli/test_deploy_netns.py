"""Multi-host: ``fedq serve`` in one network namespace and two ``fedq join`` in two others, each
reaching the server only across its own veth (one of them shaped to 20 Mbit/s), with TLS on the
server's veth addresses and per-client tokens. Needs root and iproute2; skipped otherwise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.netns import veth_star

from fedq.bench.netlink import link_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
FEDQ = Path(sys.executable).with_name("fedq")
REASON = link_unavailable_reason()
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}

pytestmark = [
    pytest.mark.netns,
    pytest.mark.xdist_group("netns"),  # one at a time with the other namespace tests
    pytest.mark.slow,
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
]


def _in(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, str(FEDQ), *args]


def test_clients_in_other_namespaces_join_over_tls(tmp_path: Path) -> None:
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
    scenario = str(ROOT / "scenarios" / "quickstart.yaml")
    run = subprocess.run(
        [str(FEDQ), "shard", scenario, *over, "--out", str(tmp_path / "data")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    with veth_star(2) as star:
        # shape client 1's link (both directions) after the fact: the run must still complete
        ns1, _, _ = star.links[1]
        dev = (
            subprocess.run(
                ["ip", "-n", ns1, "-o", "link", "show", "type", "veth"],
                capture_output=True,
                text=True,
            )
            .stdout.split(":")[1]
            .strip()
        )
        dev = dev.split("@")[0]
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns1,
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                "20mbit",
                "burst",
                "64kb",
                "latency",
                "100ms",
            ],
            check=True,
        )
        certs = tmp_path / "certs"
        hosts = [a for ip in star.server_ips for a in ("--host", ip)]
        made = subprocess.run(
            [str(FEDQ), "certs", str(certs), "--clients", "2", *hosts],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        server = subprocess.Popen(
            _in(
                star.server_ns,
                "serve",
                scenario,
                *over,
                "--listen",
                "0.0.0.0:50061",
                "--tokens",
                str(certs / "tokens.yaml"),
                "--cert",
                str(certs / "server.pem"),
                "--key",
                str(certs / "server.key"),
                "--out",
                str(tmp_path / "run"),
            ),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert server.stdout is not None
        line = server.stdout.readline()
        while line and "listening on" not in line:
            line = server.stdout.readline()
        assert "listening on 0.0.0.0:50061 (TLS)" in line, line
        joins = []
        for i, (ns, _, server_ip) in enumerate(star.links):
            cid = f"client-{i}"
            joins.append(
                subprocess.Popen(
                    _in(
                        ns,
                        "join",
                        "--server",
                        f"{server_ip}:50061",
                        "--client-id",
                        cid,
                        "--token-file",
                        str(certs / "clients" / f"{cid}.token"),
                        "--ca",
                        str(certs / "ca.pem"),
                        "--give-up-after",
                        "60",
                        "--data",
                        f"npz:{tmp_path / 'data'}/{cid}.npz",
                    ),
                    env=ENV,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outs = [j.communicate(timeout=300)[0] for j in joins]
        log = server.communicate(timeout=120)[0]
        assert server.returncode == 0, log
        assert all(j.returncode == 0 for j in joins), outs
        # the plain loopback of a client's namespace cannot reach the server: only the veth can
        probe = subprocess.run(
            _in(
                star.links[0][0],
                "join",
                "--server",
                "127.0.0.1:50061",
                "--client-id",
                "client-0",
                "--token-file",
                str(certs / "clients" / "client-0.token"),
                "--data",
                "digits",
                "--give-up-after",
                "1",
            ),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 2 and "UNAVAILABLE" in probe.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    for i, out in enumerate(outs):
        assert "(TLS)" in out and "done: completed 2 rounds" in out
        found = re.search(r"up (\d+) B, down (\d+) B", out)
        assert found is not None
        assert summary["clients"][f"client-{i}"] == {
            "bytes_up": int(found.group(1)),
            "bytes_down": int(found.group(2)),
        }
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert star.server_ns not in left and all(ns not in left for ns, _, _ in star.links)
