"""Where a simulation's hosts run, and which logical clients and data each worker has.

:func:`plan_hosts` (no Ray): the server and K workers, each with the Ray resources it asks for
(``runtime.cpus_per_worker``, ``gpus_per_worker``, a custom resource of ``server_resource`` or of
its site) and, for a worker, its clients: client ``c`` on worker ``c % K``; with
``runtime.sites`` each site holds the next ``clients`` of the roster, the j-th of them on the
site's worker ``j % workers``, and a site with ``data`` has each of its workers read that source
on the node it runs on (:class:`SiteData`), cut among the site's clients.

:func:`reserve_hosts` checks the asks against the cluster's nodes (a host no node can take, or
more of a resource than the cluster has, is a :class:`~fedq.errors.ConfigError` naming the key
that asked, what is missing and what the nodes have), then reserves every host in one Ray
placement group (``runtime.placement``: SPREAD or PACK) before any host starts, and says on which
node each landed. A custom resource works as a node label: hosts ask for a tiny share of it.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedq.config import RunConfig, RuntimeConfig
from fedq.errors import ConfigError, FedqError
from fedq.runtime.backend import GPU_SHARE, InProcessBackend, RayBackend, wants_gpu

#: Share of a custom resource (``runtime.server_resource``, a site's ``resource``) one host asks
#: for: the resource marks nodes, any positive amount on a node admits up to 1000 hosts.
LABEL_SHARE = 0.001
#: CPUs a host asks for when ``runtime.cpus_per_worker`` is 0 (Ray refuses empty bundles in a
#: placement group): up to 100 hosts per CPU, so a small machine still takes a server and many
#: workers, which cap their own torch threads.
MIN_CPU = 0.01
#: Resources of a Ray node that are not worth showing in an error message.
_HIDDEN = ("memory", "object_store_memory", "node:")


@dataclass(frozen=True)
class SiteData:
    """A site's own data source (``npz:``, ``csv:``, ``py:`` or a built-in data set, as
    ``fedq join --data`` takes it), read where the worker runs and cut among the site's
    ``count`` clients (roster indices ``first`` ..) as ``data.partition`` says; a one-client site
    takes it whole, in file order, exactly as a ``fedq join`` site does."""

    source: str
    first: int
    count: int

    def shards(self, cfg: RunConfig, clients: Sequence[int]) -> dict[str, Any]:
        """Shards of ``clients`` (roster indices of this site), by client id."""
        import torch

        from fedq.data import partition
        from fedq.data.datasets import Shard
        from fedq.rounds import client_name
        from fedq.runtime.sitedata import load_site_data

        train = load_site_data(self.source, seed=cfg.seed)
        if self.count == 1:
            parts = [torch.arange(len(train))]
        else:
            d = cfg.data
            parts = partition(
                train.y,
                self.count,
                d.partition,
                seed=cfg.seed,
                alpha=d.alpha,
                classes_per_client=d.classes_per_client,
            )
        return {client_name(c): Shard(train, parts[c - self.first]) for c in clients}

    @staticmethod
    def check(shards: dict[str, Any], joined: Any) -> None:
        """The site's data must fit the run's model (as ``fedq join`` checks its own)."""
        from fedq.runtime.sitedata import check_site_data

        check_site_data(next(iter(shards.values())).data, joined)


@dataclass(frozen=True)
class HostPlan:
    """One host: ``principal`` (``server`` or ``worker-<k>``), its clients (roster indices),
    the Ray resources it asks for and, per resource, the key of the scenario that asked."""

    principal: str
    clients: tuple[int, ...]
    ask: dict[str, float]
    keys: dict[str, str] = field(default_factory=dict)
    site: int | None = None
    data: SiteData | None = None


def _ask(
    cpus: float, gpus: float, gpu_key: str, label: str | None, label_key: str
) -> tuple[dict[str, float], dict[str, str]]:
    ask = {"CPU": cpus or MIN_CPU}
    keys = {"CPU": "runtime.cpus_per_worker" if cpus else "runtime.placement"}
    if gpus:
        ask["GPU"], keys["GPU"] = gpus, gpu_key
    if label:
        ask[label], keys[label] = LABEL_SHARE, label_key
    return ask, keys


def plan_hosts(cfg: RunConfig, workers: int) -> list[HostPlan]:
    """The server first, then every worker (module docstring). ``workers`` is K when the
    scenario has no ``runtime.sites`` (each site names its own)."""
    rt = cfg.runtime
    share = GPU_SHARE if wants_gpu(rt) else 0.0  # runtime.device cuda: a small share each
    gpus = share if rt.gpus_per_worker is None else rt.gpus_per_worker
    gpu_key = "runtime.device" if rt.gpus_per_worker is None else "runtime.gpus_per_worker"
    ask, keys = _ask(0.0, share, "runtime.device", rt.server_resource, "runtime.server_resource")
    hosts = [HostPlan("server", (), ask, keys)]
    groups: list[tuple[int, int, int, int | None]] = []  # first client, clients, workers, site
    first = 0
    for i, s in enumerate(rt.sites):
        groups.append((first, s.clients, s.workers, i))
        first += s.clients
    if not rt.sites:
        groups.append((0, cfg.rounds.num_clients, workers, None))
    for first, count, k, site_index in groups:
        label, data = None, None
        if site_index is not None:
            site = rt.sites[site_index]
            label = site.resource
            data = None if site.data is None else SiteData(site.data, first, count)
        label_key = f"runtime.sites[{site_index}].resource"
        for j in range(k):
            ask, keys = _ask(rt.cpus_per_worker, gpus, gpu_key, label, label_key)
            clients = tuple(range(first + j, first + count, k))
            hosts.append(HostPlan(f"worker-{len(hosts) - 1}", clients, ask, keys, site_index, data))
    return hosts


def compact(indices: Sequence[int]) -> str:
    """Roster indices as short text: ``0-49``, ``1-99/2`` (every second), ``0-2,7,9-11``."""
    xs = sorted(indices)
    if len(xs) >= 3:
        step = xs[1] - xs[0]
        if step > 1 and all(b - a == step for a, b in itertools.pairwise(xs)):
            return f"{xs[0]}-{xs[-1]}/{step}"
    runs: list[list[int]] = []
    for x in xs:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _node_text(node: dict[str, Any]) -> str:
    shown = {k: v for k, v in sorted(node["resources"].items()) if not k.startswith(_HIDDEN)}
    res = ", ".join(f"{k} {v:g}" for k, v in shown.items()) or "no resources"
    return f"{node['node_ip']} ({node['hostname']}): {res}"


def fit_problems(hosts: Sequence[HostPlan], nodes: Sequence[dict[str, Any]]) -> list[str]:
    """What keeps the cluster's ``nodes`` (alive, with their total resources) from taking
    ``hosts``: a host no node can hold, or more of a resource than all nodes have together.
    Empty when the plan fits on paper (Ray may still be unable to reserve it right now)."""
    problems: list[str] = []

    def add(line: str) -> None:
        if line not in problems:
            problems.append(line)

    for h in hosts:
        if any(all(n["resources"].get(r, 0.0) >= v for r, v in h.ask.items()) for n in nodes):
            continue
        short = False
        for r, v in h.ask.items():
            most = max((n["resources"].get(r, 0.0) for n in nodes), default=0.0)
            if most < v:
                short = True
                has = f"the most any node has is {most:g}" if most else f"no node has {r!r}"
                what = "the server" if h.principal == "server" else "each worker"
                add(f"{h.keys[r]}: {what} asks for {v:g} {r}, but {has}")
        if not short:
            add(f"{h.principal}: no node has all of {_fmt(h.ask)} at once")
    for r in sorted({r for h in hosts for r in h.ask}):
        want = sum(h.ask.get(r, 0.0) for h in hosts)
        have = sum(n["resources"].get(r, 0.0) for n in nodes)
        if have and want > have + 1e-9:
            key = next(h.keys[r] for h in reversed(hosts) if r in h.ask)  # a worker's, if any
            key = "runtime.workers" if key == "runtime.placement" else key  # too many hosts
            add(
                f"{key}: the run's {len(hosts)} hosts ask for {want:g} {r} in all, but the "
                f"cluster has {have:g}"
            )
    if problems:
        problems.append("the cluster's nodes: " + "; ".join(_node_text(n) for n in nodes))
    return problems


def _fmt(ask: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in ask.items()) + "}"


def reserve_hosts(
    backend: InProcessBackend | RayBackend, hosts: Sequence[HostPlan], rt: RuntimeConfig
) -> list[dict[str, Any]]:
    """Check, then reserve every host on the cluster (module docstring); returns the node each
    host will run on (``node_id``, ``node_ip``, ``hostname``), in ``hosts`` order."""
    if isinstance(backend, InProcessBackend):
        here = {"node_id": None, "node_ip": None, "hostname": socket.gethostname()}
        return [dict(here) for _ in hosts]
    nodes = backend.nodes()
    problems = fit_problems(hosts, nodes)
    if problems:
        raise ConfigError(problems)
    placed = backend.reserve([h.ask for h in hosts], rt.placement, rt.placement_timeout_s)
    if placed is None:
        free = backend.available()
        shown = ", ".join(
            f"{k} {v:g}" for k, v in sorted(free.items()) if not k.startswith(_HIDDEN)
        )
        raise ConfigError(
            f"runtime.placement: Ray could not reserve the run's {len(hosts)} hosts "
            f"({rt.placement}) within runtime.placement_timeout_s={rt.placement_timeout_s:g} s; "
            f"free in the cluster now: {shown or 'nothing'} (other jobs may hold the rest)"
        )
    by_id = {n["node_id"]: n for n in backend.nodes()}
    gone = sorted(set(placed) - set(by_id))
    if gone:
        raise FedqError(f"Ray placed hosts on node(s) {', '.join(gone)}, which left the cluster")
    return [{k: by_id[nid][k] for k in ("node_id", "node_ip", "hostname")} for nid in placed]


def location() -> dict[str, Any]:
    """Where the calling process runs: host name and pid, and its Ray node (id and address) when
    it is a Ray worker (else null)."""
    out: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "node_id": None,
        "node_ip": None,
    }
    ray = sys.modules.get("ray")  # imported by every Ray worker; never imported here
    if ray is not None and ray.is_initialized():
        out["node_id"] = ray.get_runtime_context().get_node_id()
        out["node_ip"] = ray.util.get_node_ip_address()
    return out
