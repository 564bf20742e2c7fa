"""A federated client worker holds state only for the clients that ran a task, and can hand a
checkpoint just the states that changed since the previous one."""

from __future__ import annotations

from typing import Any

import torch

from fedq.config import config_from_dict
from fedq.data.datasets import Shard
from fedq.fed.client import ClientWorker
from fedq.fed.server import FedServer
from fedq.rounds import client_name
from fedq.runtime.setup import build_bundle, client_partitions, load_data


def test_changes_are_the_states_of_the_clients_that_ran_since_the_last_mark(rounds: Any) -> None:
    cfg = config_from_dict(
        {
            "seed": 2,
            "data": {"name": "digits", "partition": "iid", "max_train": 300},
            "model": {"name": "mlp", "hidden": 8},
            "rounds": {"count": 2, "num_clients": 12, "clients_per_round": 2},
            "compression": {"uplink": {"policy": "fixed", "bits": 3, "error_feedback": True}},
        }
    )
    split = load_data(cfg)
    parts = client_partitions(cfg, split.train)
    shards = {client_name(i): Shard(split.train, p) for i, p in enumerate(parts)}
    server = FedServer(cfg, build_bundle(cfg, split.train), split.test)
    _, hooks, nodes = rounds(cfg, server, shards, grpc=False, hosts={"site": list(shards)})
    runner = nodes[0].runner
    assert isinstance(runner, ClientWorker)
    ran = {c for rec in hooks.records for c in rec["updated"]}
    assert 2 <= len(ran) <= 4
    assert runner.states.keys() == ran  # nothing made for the clients never selected

    mark, changed = runner.changes(0)
    assert changed.keys() == ran
    full = runner.state_dict()
    for cid, state in changed.items():
        res = state["uplink"]["compressor"]["residuals"]
        assert res and all(
            torch.equal(v, full[cid]["uplink"]["compressor"]["residuals"][k])
            for k, v in res.items()
        )
    assert runner.changes(mark) == (mark, {})  # nothing ran since
