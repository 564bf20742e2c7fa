"""DP-SGD is accounted where the data is: every client runs its own accountant and reports its
epsilon with each update; the server's ledger (which charged at round open) agrees with every
report, and a report above the ledger is flagged."""

from __future__ import annotations

from typing import Any

import pytest

from fedq.config import config_from_dict
from fedq.data.datasets import Shard
from fedq.fed.server import FedServer
from fedq.rounds import client_name
from fedq.runtime.setup import build_bundle, client_partitions, load_data


def test_clients_report_their_own_epsilon_and_the_ledger_agrees(rounds: Any) -> None:
    cfg = config_from_dict(
        {
            "seed": 2,
            "data": {"name": "digits", "max_train": 240},
            "model": {"name": "mlp", "hidden": 8},
            "train": {"batch_size": 16, "lr": 0.1},
            "rounds": {"count": 3, "num_clients": 3, "clients_per_round": 2},
            "privacy": {"mechanism": "dpsgd", "noise_multiplier": 1.1, "clip_norm": 1.0},
            "runtime": {"backend": "inprocess"},
        }
    )
    split = load_data(cfg)
    parts = client_partitions(cfg, split.train)
    shards = {client_name(i): Shard(split.train, p) for i, p in enumerate(parts)}
    server = FedServer(cfg, build_bundle(cfg, split.train), split.test)
    _, hooks, _ = rounds(cfg, server, shards, grpc=False)
    recs = hooks.records
    assert len(recs) == 3 and all(r["applied"] for r in recs)
    ledger = server.privacy
    for r in recs:
        assert r["epsilon_disagrees"] == []
        assert 0 < r["epsilon_reported"] <= r["epsilon"] + 1e-9
    # every client's report equals what the server charged it (same accountant, same steps)
    worst = max(a.epsilon() for a in ledger.clients.values())
    assert recs[-1]["epsilon"] == pytest.approx(worst)
    assert ledger.disagreements({0: ledger.clients[0].epsilon() * 1.5}) == [0]
    assert ledger.disagreements({0: ledger.clients[0].epsilon()}) == []
