"""``fedq simulate`` on a two-node Ray cluster, through the real CLI, as README "Scaling out on a
Ray cluster" shows it: the server on the head node (resource ``hub``), listening on that node's
address with TLS, and clients on the other node (resource ``site_b``), one site reading its own
file there. A federated run and a split run, each checked from the node report in summary.json.

The cluster: with root and iproute2, the head in one network namespace and the worker node in
another, joined by a veth pair (so the hosts' traffic crosses it; its byte counters are checked);
otherwise (or with ``FEDQ_TEST_RAY_CLUSTER=local``) two nodes on this machine made with
``ray.cluster_utils``. Either way only this test's Ray processes are ended afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.netns import namespaces_left

from fedq.bench.netlink import link_unavailable_reason, ray_pair

ROOT = Path(__file__).resolve().parents[2]
FEDQ = Path(sys.executable).with_name("fedq")
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}
REASON = link_unavailable_reason()
KIND = os.environ.get("FEDQ_TEST_RAY_CLUSTER") or ("netns" if REASON is None else "local")

NO_CLI = "the fedq entry point is not installed"
# One at a time under pytest-xdist (``--dist loadgroup``), with the other tests that build
# network namespaces: they list the machine's namespaces and Ray nodes.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FEDQ.exists(), reason=NO_CLI),
    pytest.mark.xdist_group("netns"),
]
if KIND == "netns":
    pytestmark.append(pytest.mark.netns)


def readme_block() -> list[list[str]]:
    """The commands of the README's Ray cluster recipe (comments dropped, lines joined)."""
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    block = next(b for b in blocks if "ray start --head" in b)
    lines = [x for x in block.replace("\\\n", " ").splitlines() if x.strip()]
    return [shlex.split(x, comments=True) for x in lines if not x.lstrip().startswith("#")]


def _resources(cmd: list[str]) -> dict[str, float]:
    return dict(json.loads(cmd[cmd.index("--resources") + 1]))


@dataclass
class Cluster:
    address: str
    head_ip: str
    head_ns: str | None = None  # netns only: where the driver runs, and the veth ends
    worker_ns: str | None = None
    worker_ip: str | None = None

    def fedq(self, *args: str) -> list[str]:
        pre = ["ip", "netns", "exec", self.head_ns] if self.head_ns else []
        return [*pre, str(FEDQ), *args]

    def veth_bytes(self) -> tuple[int, int]:
        """Bytes the worker node's veth end has sent and received so far."""
        assert self.worker_ns is not None
        cmd = ["ip", "-n", self.worker_ns, "-s", "-j", "link", "show", "type", "veth"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])


def test_the_readme_recipe_starts_a_head_and_a_site_node_then_simulates() -> None:
    head, node, run = readme_block()
    assert head[:3] == ["ray", "start", "--head"] and _resources(head) == {"hub": 1}
    assert node[:4] == ["ray", "start", "--address", "HEAD_IP:6379"]
    assert _resources(node) == {"site_b": 1}
    assert run == [
        "fedq",
        "simulate",
        "scenarios/quickstart_sites.yaml",
        "--set",
        "runtime.ray_address=HEAD_IP:6379",
    ]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    head, node, _ = readme_block()
    if KIND == "netns":
        with ray_pair(_resources(head), _resources(node)) as pair:
            link = pair.link
            yield Cluster(
                pair.address, link.server_ip, link.server_ns, link.client_ns, link.client_ip
            )
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert link.server_ns not in left and link.client_ns not in left
        assert not [ns for ns in namespaces_left() if link.server_ns[4:] in ns]
        return
    yield from _local_cluster(_resources(head), _resources(node))


def _local_cluster(head: dict[str, float], node: dict[str, float]) -> Iterator[Cluster]:
    """Two Ray nodes on this machine's address (``ray.cluster_utils``; Ray would turn a
    127.0.0.1 into that address when connecting anyway), session files in a private folder."""
    import ray._private.utils
    from ray.cluster_utils import Cluster as RayCluster

    tmp = tempfile.mkdtemp(prefix="fqrc-", dir="/tmp" if os.path.isdir("/tmp") else None)
    saved = ray._private.utils.write_ray_address
    # cluster_utils records its address in the machine-wide default folder, where a plain
    # ray.init() of any other process would find it: keep it to ourselves
    ray._private.utils.write_ray_address = lambda *a, **k: None
    common = {"num_cpus": 1, "object_store_memory": 100_000_000, "temp_dir": tmp}
    cluster = RayCluster(
        initialize_head=True,
        shutdown_at_exit=True,
        head_node_args={**common, "resources": head, "include_dashboard": False},
    )
    try:
        cluster.add_node(**common, resources=node)
        yield Cluster(cluster.address, cluster.head_node.node_ip_address)
    finally:
        cluster.shutdown()
        ray._private.utils.write_ray_address = saved
        subprocess.run(["rm", "-rf", tmp], check=False)


def _simulate(cluster: Cluster, out: Path, *args: str) -> tuple[dict, str]:
    before = cluster.veth_bytes() if cluster.worker_ns else (0, 0)
    done = subprocess.run(
        cluster.fedq(*args, "--out", str(out), "-q"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    if cluster.worker_ns:  # the clients' traffic (and Ray's) crossed the veth
        sent, received = (b - a for a, b in zip(before, cluster.veth_bytes(), strict=True))
        assert sent >= summary["bytes_up_total"] > 0
        assert received >= summary["bytes_down_total"] > 0
    return summary, done.stdout


def _check_server(cluster: Cluster, summary: dict, shown: str) -> dict:
    pl = summary["placement"]
    assert pl["cluster"] is True and pl["backend"] == "ray" and pl["tls"] is True
    assert pl["address"].startswith(f"{cluster.head_ip}:")  # the head node's own address
    assert pl["server"]["node_ip"] == cluster.head_ip and pl["server"]["resource"] == "hub"
    assert f"listening on {pl['address']} (TLS)" in shown
    return pl


def test_federated_run_with_a_site_on_the_other_node(cluster: Cluster, tmp_path: Path) -> None:
    from fedq.config import load_scenario
    from fedq.runtime.shard import write_shards

    _, _, run = readme_block()
    site_b = write_shards(
        load_scenario(
            ROOT / "scenarios" / "quickstart.yaml",
            ["rounds.num_clients=2", "rounds.clients_per_round=2"],
        ),
        tmp_path / "data",
    )[1]
    sites = (
        f"[{{resource: hub, clients: 1}}, {{resource: site_b, clients: 3, data: 'npz:{site_b}'}}]"
    )
    args = [a.replace("HEAD_IP:6379", cluster.address) for a in run[1:]]
    summary, shown = _simulate(
        cluster,
        tmp_path / "run",
        *args,
        "--set",
        "rounds.count=2",
        "--set",
        f"runtime.sites={sites}",
    )
    assert summary["rounds_completed"] == 2 and summary["stopped_reason"] is None
    pl = _check_server(cluster, summary, shown)
    w0, w1 = pl["workers"]["worker-0"], pl["workers"]["worker-1"]
    assert w0["node_id"] == pl["server"]["node_id"] and w0["clients"] == "0"
    assert w1["node_id"] != pl["server"]["node_id"]  # the other node
    assert (w1["clients"], w1["resource"], w1["data"]) == ("1-3", "site_b", f"npz:{site_b}")
    if cluster.worker_ip:
        assert w1["node_ip"] == cluster.worker_ip
        assert f"workers on {cluster.worker_ip} ({w1['hostname']}): worker-1 clients 1-3" in shown
    assert summary["client_bytes_up"] == summary["bytes_up_total"]


def test_split_run_with_every_client_on_the_other_node(cluster: Cluster, tmp_path: Path) -> None:
    summary, shown = _simulate(
        cluster,
        tmp_path / "run",
        "simulate",
        "scenarios/split_tiny.yaml",
        "--set",
        f"runtime.ray_address={cluster.address}",
        "--set",
        "runtime.backend=ray",
        "--set",
        "runtime.workers=0",
        "--set",
        "rounds.count=2",
        "--set",
        "runtime.server_resource=hub",
        "--set",
        "runtime.sites=[{resource: site_b, clients: 2}]",
    )
    assert summary["rounds_completed"] == 2 and summary["mode"] == "split"
    pl = _check_server(cluster, summary, shown)
    ((name, w),) = pl["workers"].items()
    assert name == "worker-0" and w["clients"] == "0-1"
    assert w["node_id"] != pl["server"]["node_id"]
    if cluster.worker_ip:
        assert w["node_ip"] == cluster.worker_ip


@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_netlink_cluster_runs_one_command_on_a_fresh_pair_and_leaves_nothing() -> None:
    """``python -m fedq.bench.netlink cluster SPEC`` (what BENCHMARKS.md uses): the command runs
    in the head's namespace against both nodes, its exit status comes back, and both namespaces
    are gone (their processes ended, or the tool would have failed)."""
    probe = (
        "import ray; ray.init(address='HEAD_ADDRESS', log_to_driver=False); "
        "print(sorted(k for n in ray.nodes() for k in n['Resources'] if k.startswith('r_'))); "
        "raise SystemExit(3)"
    )
    spec = {"head": {"r_head": 1}, "node": {"r_node": 1}, "argv": [sys.executable, "-c", probe]}
    done = subprocess.run(
        [sys.executable, "-m", "fedq.bench.netlink", "cluster", json.dumps(spec)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr
    assert "['r_head', 'r_node']" in done.stdout
    used = re.findall(r"namespace (fq[sc]-[0-9a-f]+)", done.stdout)
    assert len(used) == 2 and not set(used) & set(namespaces_left())
