"""Placement of a simulation's hosts: the ``runtime`` keys that say where hosts go (parsed and
checked strictly), which clients and data each worker gets, the resources each host asks of Ray,
and a placement the cluster cannot take reported as one ConfigError before any host starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedq.config import SiteConfig, config_from_dict, load_scenario
from fedq.errors import ConfigError
from fedq.runtime.placement import (
    LABEL_SHARE,
    MIN_CPU,
    SiteData,
    compact,
    fit_problems,
    plan_hosts,
    reserve_hosts,
)

ROOT = Path(__file__).resolve().parents[2]


def _cfg(runtime: dict[str, Any], clients: int = 6, **extra: Any) -> Any:
    rounds = {"num_clients": clients, "clients_per_round": clients}
    return config_from_dict({"rounds": rounds, "runtime": runtime, **extra})


def test_sites_parse_from_yaml_and_round_trip_through_config_json(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(
        "rounds: {num_clients: 6, clients_per_round: 6}\n"
        "runtime:\n"
        "  placement: pack\n"
        "  server_resource: head\n"
        "  cpus_per_worker: 0.5\n"
        "  gpus_per_worker: 0.25\n"
        "  sites:\n"
        "    - {resource: site_a, clients: 4, workers: 2, data: 'npz:/data/a.npz'}\n"
        "    - {clients: 2}\n"
    )
    cfg = load_scenario(f)
    rt = cfg.runtime
    assert rt.placement == "pack" and rt.server_resource == "head"
    assert rt.cpus_per_worker == 0.5 and rt.gpus_per_worker == 0.25
    assert rt.sites == (
        SiteConfig(resource="site_a", clients=4, workers=2, data="npz:/data/a.npz"),
        SiteConfig(clients=2),
    )
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert saved["runtime"]["sites"][1] == {
        "clients": 2,
        "resource": None,
        "data": None,
        "workers": 1,
    }
    assert config_from_dict(saved) == cfg
    # the same through --set, as YAML flow
    over = load_scenario(f, ["runtime.sites=[{resource: x, clients: 6}]", "runtime.tls=always"])
    assert over.runtime.sites == (SiteConfig(resource="x", clients=6),)
    assert over.runtime.tls == "always"


def test_bad_placement_keys_are_all_reported_at_once() -> None:
    with pytest.raises(ConfigError) as ei:
        _cfg(
            {
                "workers": 2,
                "placement": "scatter",
                "cpus_per_worker": -1,
                "tls": "on",
                "placement_timeout_s": 0,
                "sites": [
                    {"resource": "a", "clients": 3, "workers": 4, "where": 1},
                    {"clients": 0, "resource": ""},
                    {"clients": 1, "data": ""},
                ],
            }
        )
    text = "\n".join(ei.value.problems)
    for expected in (
        "runtime.placement: must be one of 'spread' | 'pack', got 'scatter'",
        "runtime.cpus_per_worker: must be >= 0",
        "runtime.tls: must be one of 'auto' | 'always'",
        "runtime.placement_timeout_s: must be > 0",
        "runtime.sites[0].where: unknown key (allowed in runtime.sites[0]: clients, resource, "
        "data, workers)",
    ):
        assert expected in text, expected
    with pytest.raises(ConfigError) as ei:
        _cfg(
            {
                "workers": 2,
                "sites": [
                    {"resource": "a", "clients": 3, "workers": 4},
                    {"clients": 0, "resource": ""},
                    {"clients": 1, "data": ""},
                ],
            }
        )
    text = "\n".join(ei.value.problems)
    for expected in (
        "runtime.sites[0].workers: must be in 1..clients (3), got 4",
        "runtime.sites[1].clients: must be >= 1, got 0",
        "runtime.sites[1].resource: must be a Ray resource name or null",
        "runtime.sites[2].data: must be a data source or null",
        "runtime.workers: with runtime.sites each site says how many workers it has",
        "runtime.sites: the sites hold 4 clients in all (3 + 0 + 1), but rounds.num_clients is 6",
    ):
        assert expected in text, expected
    with pytest.raises(ConfigError, match=r"runtime\.sites: expected a list, got dict"):
        _cfg({"sites": {"resource": "a", "clients": 6}})


def test_ray_placement_needs_the_ray_backend() -> None:
    with pytest.raises(ConfigError) as ei:
        _cfg(
            {
                "backend": "inprocess",
                "server_resource": "head",
                "cpus_per_worker": 1,
                "sites": [{"resource": "a", "clients": 6}],
            }
        )
    assert ei.value.problems == [
        f"runtime.{k}: placement on Ray nodes needs runtime.backend 'ray'"
        for k in ("cpus_per_worker", "server_resource", "sites[0].resource")
    ]
    # sites without resources (data locality only) are fine in process
    _cfg({"backend": "inprocess", "sites": [{"clients": 6, "data": "digits"}]})


def test_without_sites_client_c_is_on_worker_c_mod_k_and_hosts_ask_a_little_cpu() -> None:
    plan = plan_hosts(_cfg({}, clients=7), workers=3)
    assert [h.principal for h in plan] == ["server", "worker-0", "worker-1", "worker-2"]
    assert [h.clients for h in plan] == [(), (0, 3, 6), (1, 4), (2, 5)]
    assert all(h.ask == {"CPU": MIN_CPU} and h.data is None and h.site is None for h in plan)


def test_sites_hold_consecutive_clients_each_on_its_own_workers() -> None:
    cfg = _cfg(
        {
            "server_resource": "head",
            "cpus_per_worker": 2,
            "gpus_per_worker": 0.5,
            "sites": [
                {"resource": "site_a", "clients": 5, "workers": 2, "data": "npz:/data/a.npz"},
                {"clients": 3},
            ],
        },
        clients=8,
    )
    server, *workers = plan_hosts(cfg, workers=99)  # K comes from the sites
    assert server.ask == {"CPU": MIN_CPU, "head": LABEL_SHARE}
    assert server.keys["head"] == "runtime.server_resource"
    assert [(w.principal, w.clients, w.site) for w in workers] == [
        ("worker-0", (0, 2, 4), 0),
        ("worker-1", (1, 3), 0),
        ("worker-2", (5, 6, 7), 1),
    ]
    assert workers[0].ask == {"CPU": 2.0, "GPU": 0.5, "site_a": LABEL_SHARE}
    assert workers[0].keys == {
        "CPU": "runtime.cpus_per_worker",
        "GPU": "runtime.gpus_per_worker",
        "site_a": "runtime.sites[0].resource",
    }
    assert workers[2].ask == {"CPU": 2.0, "GPU": 0.5}
    assert workers[0].data == workers[1].data == SiteData("npz:/data/a.npz", first=0, count=5)
    assert workers[2].data is None


def test_a_site_reads_its_own_data_and_cuts_it_among_its_clients(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    cfg = _cfg(
        {"sites": [{"clients": 2}, {"clients": 3, "data": f"npz:{tmp_path / 'a.npz'}"}]},
        clients=5,
        data={"partition": "iid"},
    )
    site = SiteData(f"npz:{tmp_path / 'a.npz'}", first=2, count=3)
    shards = site.shards(cfg, [2, 4])
    assert list(shards) == ["client-2", "client-4"]
    every = site.shards(cfg, [2, 3, 4])
    rows = np.concatenate([s.idx.numpy() for s in every.values()])
    assert sorted(rows.tolist()) == list(range(60))  # a partition of the site's own rows
    assert shards["client-4"].idx.tolist() == every["client-4"].idx.tolist()  # same on any worker
    whole = SiteData(f"npz:{tmp_path / 'a.npz'}", first=0, count=1).shards(cfg, [0])
    assert whole["client-0"].idx.tolist() == list(range(60))  # one client: all of it, in order


def test_compact_client_lists() -> None:
    assert compact([0]) == "0"
    assert compact(range(50)) == "0-49"
    assert compact([1, 3, 5, 7]) == "1-7/2"
    assert compact([0, 4]) == "0,4"
    assert compact([7, 0, 1, 2, 9, 10, 11]) == "0-2,7,9-11"
    assert compact([]) == ""


NODES = [
    {
        "node_id": "a",
        "node_ip": "10.0.0.1",
        "hostname": "head",
        "resources": {"CPU": 2.0, "site_a": 1.0, "memory": 1e9, "node:10.0.0.1": 1.0},
    },
    {
        "node_id": "b",
        "node_ip": "10.0.0.2",
        "hostname": "gpu",
        "resources": {"CPU": 4.0, "GPU": 1.0, "site_b": 1.0},
    },
]


def test_a_plan_the_nodes_can_hold_has_no_problems() -> None:
    cfg = _cfg(
        {
            "server_resource": "site_a",
            "cpus_per_worker": 1,
            "sites": [{"resource": "site_b", "clients": 6, "workers": 3}],
        }
    )
    assert fit_problems(plan_hosts(cfg, 0), NODES) == []


def test_unsatisfiable_asks_name_the_key_what_is_missing_and_what_the_nodes_have() -> None:
    cfg = _cfg(
        {
            "server_resource": "nowhere",
            "cpus_per_worker": 8,
            "gpus_per_worker": 2,
            "sites": [{"resource": "site_a", "clients": 6, "workers": 2}],
        }
    )
    problems = fit_problems(plan_hosts(cfg, 0), NODES)
    assert problems == [
        "runtime.server_resource: the server asks for 0.001 nowhere, but no node has 'nowhere'",
        "runtime.cpus_per_worker: each worker asks for 8 CPU, but the most any node has is 4",
        "runtime.gpus_per_worker: each worker asks for 2 GPU, but the most any node has is 1",
        "runtime.cpus_per_worker: the run's 3 hosts ask for 16.01 CPU in all, but the cluster "
        "has 6",
        "runtime.gpus_per_worker: the run's 3 hosts ask for 4 GPU in all, but the cluster has 1",
        "the cluster's nodes: 10.0.0.1 (head): CPU 2, site_a 1; 10.0.0.2 (gpu): CPU 4, GPU 1, "
        "site_b 1",
    ]
    # each resource exists, but never together on one node
    cfg = _cfg({"gpus_per_worker": 1, "sites": [{"resource": "site_a", "clients": 6}]})
    assert fit_problems(plan_hosts(cfg, 0), NODES)[0] == (
        "worker-0: no node has all of {CPU: 0.01, GPU: 1, site_a: 0.001} at once"
    )
    # too many hosts for the least share of a CPU each
    many = fit_problems(plan_hosts(_cfg({"workers": 600}, clients=600), 600), NODES)
    assert many[0] == (
        "runtime.workers: the run's 601 hosts ask for 6.01 CPU in all, but the cluster has 6"
    )


class _Busy:
    """A Ray backend whose cluster could hold the hosts but has no room for them now."""

    name = "ray"
    attached = True

    def nodes(self) -> list[dict[str, Any]]:
        return NODES

    def reserve(self, asks: list[dict[str, float]], strategy: str, timeout: float) -> None:
        self.asked = (asks, strategy, timeout)
        return None

    def available(self) -> dict[str, float]:
        return {"CPU": 0.5, "memory": 1e9, "site_a": 1.0}


def test_a_reservation_that_times_out_is_a_config_error_naming_what_is_free() -> None:
    cfg = _cfg({"cpus_per_worker": 1, "placement": "pack", "placement_timeout_s": 5}, clients=2)
    busy = _Busy()
    plan = plan_hosts(cfg, 2)
    with pytest.raises(ConfigError) as ei:
        reserve_hosts(busy, plan, cfg.runtime)  # type: ignore[arg-type]
    assert busy.asked == ([h.ask for h in plan], "pack", 5.0)
    assert str(ei.value.problems[0]) == (
        "runtime.placement: Ray could not reserve the run's 3 hosts (pack) within "
        "runtime.placement_timeout_s=5 s; free in the cluster now: CPU 0.5, site_a 1 (other jobs "
        "may hold the rest)"
    )


@pytest.mark.slow
def test_embedded_ray_refuses_an_unknown_resource_before_any_host_starts(tmp_path: Path) -> None:
    from fedq.runtime.simulate import simulate

    cfg = load_scenario(
        ROOT / "scenarios" / "quickstart.yaml",
        [
            "runtime.server_resource=site_nobody_has",
            "runtime.cpus_per_worker=64",
            "runtime.workers=2",
            "runtime.num_cpus=2",
        ],
    )
    with pytest.raises(ConfigError) as ei:
        simulate(cfg, tmp_path / "run")
    text = "\n".join(ei.value.problems)
    assert (
        "runtime.server_resource: the server asks for 0.001 site_nobody_has, but no node has "
        "'site_nobody_has'" in text
    )
    assert (
        "runtime.cpus_per_worker: each worker asks for 64 CPU, but the most any node has is 2"
        in text
    )
    assert "the cluster's nodes: " in text and "CPU 2" in text
    assert not (tmp_path / "run").exists()  # nothing was started or written
    import ray

    assert not ray.is_initialized()  # the embedded Ray was shut down


def test_sites_with_their_own_data_and_tls_on_loopback_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole run (in process, real gRPC): two sites reading their own files, TLS with the run's
    in-memory credentials; the start line and summary.json say what ran where."""
    from fedq.cli import main
    from fedq.runtime.shard import write_shards

    scenario = ROOT / "scenarios" / "quickstart.yaml"
    files = write_shards(
        load_scenario(scenario, ["rounds.num_clients=2", "rounds.clients_per_round=2"]),
        tmp_path / "data",
    )
    sites = f"[{{clients: 2, data: 'npz:{files[0]}'}}, {{clients: 1, data: 'npz:{files[1]}'}}]"
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as ei:
        main(
            [
                "simulate",
                str(scenario),
                "--out",
                str(out),
                "-q",
                "--set",
                "runtime.backend=inprocess",
                "--set",
                "runtime.tls=always",
                "--set",
                f"runtime.sites={sites}",
                "--set",
                "rounds.num_clients=3",
                "--set",
                "rounds.clients_per_round=3",
                "--set",
                "rounds.count=2",
                "--set",
                "model.hidden=16",
            ]
        )
    assert ei.value.code == 0
    shown = capsys.readouterr().out
    assert "server in this process, listening on 127.0.0.1:" in shown and "(TLS)" in shown
    assert "workers in this process: worker-0 clients 0-1; worker-1 clients 2" in shown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    pl = summary["placement"]
    assert pl["tls"] is True and pl["cluster"] is False and pl["backend"] == "inprocess"
    assert pl["address"].startswith("127.0.0.1:")
    w0, w1 = pl["workers"]["worker-0"], pl["workers"]["worker-1"]
    assert (w0["clients"], w0["num_clients"], w0["site"], w0["data"]) == (
        "0-1",
        2,
        0,
        f"npz:{files[0]}",
    )
    assert (w1["clients"], w1["site"], w1["data"]) == ("2", 1, f"npz:{files[1]}")
    assert w0["node_ip"] is None and w0["hostname"]
    # the clients trained on their sites' files: bytes crossed both ways every round
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clients_ok"] == 3 and r["bytes_up"] > 0 for r in records)
