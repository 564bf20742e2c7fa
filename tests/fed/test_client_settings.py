"""A federated client takes the run's settings from the resolved configuration it received at
registration, not from the task's tags (which repeat them for other implementations)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from fedq.config import config_from_dict
from fedq.data.datasets import Shard
from fedq.fed.client import ClientWorker
from fedq.fed.server import FedServer
from fedq.rounds import client_name
from fedq.rounds.workload import Member
from fedq.runtime.setup import build_bundle, client_partitions, load_data
from fedq.transport import ByteCounter
from fedq.wire import WireMessage
from fedq.wire.control import Assignment


class _Conn:
    """Hands out one prepared task and keeps the update pushed back."""

    def __init__(self, task: WireMessage) -> None:
        self.task, self.counters = task, ByteCounter()
        self.updates: list[WireMessage] = []

    def get_task(self, round: int, client_id: str | None = None) -> WireMessage:
        return self.task

    def push_update(self, msg: WireMessage) -> int:
        self.updates.append(msg)
        return 0


@pytest.mark.parametrize(
    "privacy",
    [
        {"mechanism": "central", "noise_multiplier": 1.0, "clip_norm": 0.5},
        {"mechanism": "laplace", "target_epsilon": 50.0, "clip_norm": 0.5},
    ],
    ids=["central", "laplace"],
)
def test_the_privacy_mechanism_comes_from_the_config_not_the_tags(privacy: dict[str, Any]) -> None:
    cfg = config_from_dict(
        {
            "seed": 3,
            "data": {"name": "digits", "partition": "iid", "max_train": 200},
            "model": {"name": "mlp", "hidden": 8},
            "rounds": {"count": 2, "num_clients": 4, "clients_per_round": 2},
            "privacy": privacy,
        }
    )
    split = load_data(cfg)
    parts = client_partitions(cfg, split.train)
    shards = {client_name(i): Shard(split.train, p) for i, p in enumerate(parts)}
    server = FedServer(cfg, build_bundle(cfg, split.train), split.test)
    members = [Member(client_name(i), i, shards[client_name(i)].size) for i in range(2)]
    server.privacy.charge([0, 1], {m.index: m.num_examples for m in members})
    server.open_round(0, members)
    task = server.task(0, members[0])
    assert task.tags["dp_mechanism"] == privacy["mechanism"]
    bare = dataclasses.replace(task, tags={})  # what a server that sends no tags hands out
    worker = ClientWorker(
        cfg, build_bundle(cfg, split.train), shards, {c: i for i, c in enumerate(shards)}
    )
    conn = _Conn(bare)
    worker.run(Assignment(members[0].client_id, 0, 60.0), conn)  # type: ignore[arg-type]
    (update,) = conn.updates
    # update_norm is the pre-clip norm the mechanism measured; -1 means nothing was privatized
    norm = update.scalars["update_norm"]
    assert math.isfinite(norm) and norm > 0, norm
