"""Benchmark tooling: split learning over an emulated link, two network namespaces joined by a
veth pair shaped with ``tc tbf`` (``fedq bench split --link``; docs/algorithms.md §1.9
"multi-machine run": time per step under a fixed bandwidth cap, measured, not modelled), and a
two-node Ray cluster across such a link (the cluster runs of BENCHMARKS.md). Nothing outside
:mod:`fedq.bench` uses it; the tests build on it too (``tests/support/netns.py``).

:func:`veth_link` creates namespaces ``fqs-<tag>`` (server) and ``fqc-<tag>`` (client), a veth
pair ``fqs<tag>``/``fqc<tag>`` with addresses from a fresh ``10.200.X.Y/30`` it owns, and a token
bucket (``tbf rate <rate> burst 64kb latency 100ms``) on *both* ends, so each direction is capped;
everything is deleted in ``finally`` (deleting a namespace deletes its veth end). Only those
namespaces and addresses are touched. Root and iproute2 (``ip``, ``tc``) are required;
:class:`LinkUnavailable` says why not. :func:`ray_pair` starts a two-node Ray cluster across such
a link (the head in one namespace, a worker node in the other) and ends exactly its processes;
``python -m fedq.bench.netlink cluster SPEC`` runs one command on such a cluster
(:func:`on_ray_pair`).

:func:`run_link_arm` starts the split server (``python -m fedq.bench.netlink serve``) in the
server namespace and a client (``... client``) in the other with ``ip netns exec``; they talk
real gRPC over the veth (token-authenticated; plaintext is allowed explicitly because the link is
a private veth). The client reports seconds per step (compute + serialisation + transfer) and
bytes per step.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedq.errors import FedqError


class LinkUnavailable(FedqError):
    """Network namespaces cannot be created here (not root, no iproute2, no veth/tbf support)."""


@dataclass(frozen=True)
class LinkPair:
    server_ns: str
    client_ns: str
    server_ip: str
    client_ip: str
    rate: str


def link_unavailable_reason() -> str | None:
    """Why :func:`veth_link` cannot work here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's {tool!r} on PATH"
    return None


def sh(*args: str) -> None:
    """Run one iproute2 command; :class:`LinkUnavailable` with its error output if it fails."""
    out = subprocess.run(list(args), capture_output=True, text=True)
    if out.returncode != 0:
        raise LinkUnavailable(f"{' '.join(args)} failed: {out.stderr.strip()}")


def shape(ns: str, dev: str, rate: str) -> None:
    """Cap what ``dev`` (in namespace ``ns``) sends to ``rate`` with a token bucket."""
    tbf = ["tbf", "rate", rate, "burst", "64kb", "latency", "100ms"]
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *tbf)


@contextmanager
def veth_link(rate: str = "100mbit") -> Iterator[LinkPair]:
    """Two namespaces and a shaped veth pair between them (module docstring); always cleaned."""
    reason = link_unavailable_reason()
    if reason:
        raise LinkUnavailable(reason)
    tag = secrets.token_hex(3)
    ns_s, ns_c, if_s, if_c = f"fqs-{tag}", f"fqc-{tag}", f"fqs{tag}", f"fqc{tag}"
    rng = random.Random(tag)
    net, host = rng.randrange(256), 4 * rng.randrange(64)
    ip_s, ip_c = f"10.200.{net}.{host + 1}", f"10.200.{net}.{host + 2}"
    try:
        sh("ip", "netns", "add", ns_s)
        sh("ip", "netns", "add", ns_c)
        sh("ip", "link", "add", if_s, "type", "veth", "peer", "name", if_c)
        for ns, dev, ip in ((ns_s, if_s, ip_s), (ns_c, if_c, ip_c)):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            shape(ns, dev, rate)
        yield LinkPair(ns_s, ns_c, ip_s, ip_c, rate)
    finally:
        for ns in (ns_s, ns_c):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", if_s], capture_output=True)  # if never moved


# ---------------------------------------------------------------- a Ray cluster across a link


def namespace_pids(ns: str) -> list[int]:
    """The processes living in network namespace ``ns``."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def end_namespace_processes(ns: str, grace: float = 3.0, timeout: float = 20.0) -> list[int]:
    """End every process in namespace ``ns`` (SIGTERM, then SIGKILL after ``grace`` seconds) and
    wait until none is left; returns the pids found. Only that namespace's processes are touched
    (``ray stop`` would end every Ray process of the machine, other users' included)."""
    import signal

    found: set[int] = set()
    t0 = time.monotonic()
    while pids := namespace_pids(ns):
        found.update(pids)
        waited = time.monotonic() - t0
        if waited > timeout:
            raise FedqError(f"processes {pids} in {ns} outlived SIGKILL")
        sig = signal.SIGKILL if waited > grace else signal.SIGTERM
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        time.sleep(0.2)
    return sorted(found)


@dataclass(frozen=True)
class RayPair:
    """A two-node Ray cluster across ``link``: the head node in ``link.server_ns`` (its GCS at
    ``address``), a worker node in ``link.client_ns``, each with one CPU and its own
    resources. A driver runs in the head's namespace (``ip netns exec``)."""

    link: LinkPair
    address: str


@contextmanager
def ray_pair(
    head_resources: dict[str, float],
    worker_resources: dict[str, float],
    *,
    rate: str = "1gbit",
    object_store_bytes: int = 100_000_000,
    port: int = 6379,
) -> Iterator[RayPair]:
    """A Ray head in one namespace and a worker node in another (:func:`veth_link`), started with
    ``ray start`` (one CPU each, a small object store, no dashboard, session files in a fresh
    short-named folder); afterwards every process in both namespaces is ended, the folder and
    the namespaces removed, even when starting failed."""
    import json as _json
    import tempfile

    ray = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    with veth_link(rate) as link:
        # Ray's socket paths are length-limited: keep the session folder short
        tmp = Path(tempfile.mkdtemp(prefix="fqrc-", dir="/tmp" if os.path.isdir("/tmp") else None))
        common = [
            "--num-cpus",
            "1",
            "--object-store-memory",
            str(object_store_bytes),
            "--disable-usage-stats",
        ]
        address = f"{link.server_ip}:{port}"
        try:
            for ns, args in (
                (
                    link.server_ns,
                    [
                        "--head",
                        "--port",
                        str(port),
                        "--include-dashboard",
                        "false",
                        "--node-ip-address",
                        link.server_ip,
                        "--resources",
                        _json.dumps(head_resources),
                        "--temp-dir",
                        str(tmp / "head"),
                    ],
                ),
                (
                    link.client_ns,
                    [
                        "--address",
                        address,
                        "--node-ip-address",
                        link.client_ip,
                        "--resources",
                        _json.dumps(worker_resources),
                        "--temp-dir",
                        str(tmp / "node"),
                    ],
                ),
            ):
                cmd = ["ip", "netns", "exec", ns, ray, "start", *args, *common]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
                if done.returncode != 0:
                    raise FedqError(f"ray start in {ns} failed: {done.stderr.strip()[-2000:]}")
            yield RayPair(link, address)
        finally:
            for ns in (link.client_ns, link.server_ns):
                end_namespace_processes(ns)
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ the two roles


def _config(spec: dict[str, Any]) -> Any:
    from fedq.config import load_scenario

    return load_scenario(spec["scenario"], spec["overrides"])


def serve(spec: dict[str, Any]) -> dict[str, Any]:
    """Server role: ``fedq serve`` of a one-client run on ``spec['host']:spec['port']``; prints
    ``READY`` once listening, and returns the server's record of every step (``bits.jsonl``)."""
    import torch

    from fedq.runtime.deploy import serve as run_server

    cfg = _config(spec)
    torch.set_num_threads(cfg.runtime.threads_per_worker)
    out = Path(spec["out"])

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "listening":
            print("READY", flush=True)

    run_server(
        cfg,
        listen=f"{spec['host']}:{spec['port']}",
        tokens={"client-0": spec["token"]},
        out=out,
        allow_insecure=True,
        on_event=on_event,
    )
    rows = [json.loads(line) for line in (out / "bits.jsonl").read_text().splitlines()]
    return {
        "seconds": [r["seconds"] for r in rows],
        "bytes": [r["bytes_up"] + r["bytes_down"] for r in rows],
        "act_bits": [r["act_bits"] for r in rows],
    }


def client(spec: dict[str, Any]) -> dict[str, Any]:
    """Client role: ``fedq join`` as client-0 with its shard of the scenario's data."""
    import torch

    from fedq.runtime.deploy import join
    from fedq.transport.client import TransportClient

    cfg = _config(spec)
    torch.set_num_threads(cfg.runtime.threads_per_worker)
    target = f"{spec['host']}:{spec['port']}"
    with TransportClient(target, client_id="client-0", token=spec["token"], timeout=300) as conn:
        return join(conn, "client-0", spec["data"])


def run_link_arm(
    link: LinkPair,
    scenario: str | Path,
    overrides: Sequence[str],
    *,
    steps: int,
    warmup: int = 1,
    port: int = 50_551,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """One arm over ``link``: median seconds per step after ``warmup`` steps, and mean bytes."""
    import tempfile

    from fedq.config import load_scenario
    from fedq.runtime.shard import write_shards

    spec: dict[str, Any] = {
        "scenario": str(scenario),
        "token": secrets.token_urlsafe(16),
        "port": port,
        "overrides": [
            *overrides,
            "rounds.num_clients=1",
            "rounds.clients_per_round=1",
            "rounds.count=1",
            f"split.local_steps={steps + warmup}",
        ],
        "host": link.server_ip,
    }
    tmp = Path(tempfile.mkdtemp(prefix="fedq-link-"))
    spec["out"] = str(tmp / "run")
    spec["data"] = "csv:" + str(
        write_shards(load_scenario(scenario, spec["overrides"]), tmp / "data")[0]
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    py = [sys.executable, "-m", "fedq.bench.netlink"]
    srv = subprocess.Popen(
        ["ip", "netns", "exec", link.server_ns, *py, "serve", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert srv.stdout is not None
        t0 = time.monotonic()
        line = srv.stdout.readline()
        if line.strip() != "READY":
            raise FedqError(f"split server in {link.server_ns} did not start (got {line!r})")
        cmd = ["ip", "netns", "exec", link.client_ns, *py, "client", json.dumps(spec)]
        left = max(timeout - (time.monotonic() - t0), 1.0)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=left)
        if res.returncode != 0:
            raise FedqError(f"split client failed: {res.stderr.strip()[-2000:]}")
        rest, _ = srv.communicate(timeout=120)
        data = json.loads(rest.strip().splitlines()[-1])
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    timed = data["seconds"][warmup:]
    return {
        "s_per_step": statistics.median(timed),
        "s_per_step_all": data["seconds"],
        "bytes_per_step": statistics.fmean(data["bytes"][warmup:]),
        "act_bits": statistics.fmean(data["act_bits"][warmup:]),
    }


def rate_bits_per_s(rate: str) -> float:
    """``100mbit`` -> 1e8 (tc units: kbit, mbit, gbit; decimal)."""
    r = rate.strip().lower()
    for unit, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if r.endswith(unit):
            return float(r[: -len(unit)]) * mult
    raise FedqError(f"link rate {rate!r}: use kbit, mbit or gbit")


def on_ray_pair(spec: dict[str, Any]) -> int:
    """Run ``spec['argv']`` in the head's namespace of a fresh :func:`ray_pair` (resources
    ``spec['head']`` and ``spec['node']``, link ``spec.get('rate')``), with ``HEAD_ADDRESS`` in
    it replaced by the cluster's address; returns its exit status. Everything is removed after."""
    with ray_pair(spec["head"], spec["node"], rate=spec.get("rate", "1gbit")) as pair:
        argv = [a.replace("HEAD_ADDRESS", pair.address) for a in spec["argv"]]
        link = pair.link
        print(
            f"two-node Ray cluster at {pair.address} (namespace {link.server_ns}), worker node "
            f"{link.client_ip} (namespace {link.client_ns})",
            flush=True,
        )
        return subprocess.run(["ip", "netns", "exec", link.server_ns, *argv]).returncode


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    role, spec = args[0], json.loads(args[1])
    if role == "serve":
        print(json.dumps(serve(spec)), flush=True)
    elif role == "client":
        print(json.dumps(client(spec)), flush=True)
    elif role == "cluster":
        raise SystemExit(on_ray_pair(spec))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
