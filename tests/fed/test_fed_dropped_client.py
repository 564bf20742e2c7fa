"""A client with a wrong token fails alone with a clear reason (UNAUTHENTICATED); the round is
applied from the others, and the server keeps serving."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import torch

from fedq import __version__
from fedq.config import config_from_dict
from fedq.data.datasets import Shard
from fedq.errors import TransportError
from fedq.fed.server import FedServer
from fedq.rounds import client_name
from fedq.runtime.setup import build_bundle, client_partitions, load_data
from fedq.transport import TransportClient
from fedq.wire.control import ClientInfo, Registration


class _WrongTokenForData:
    """Client 1's process: registered and following its work stream with the right token, but
    its task calls go out with a wrong one (say, a rotated token file)."""

    def __init__(self, good: TransportClient, bad: TransportClient) -> None:
        self.good, self.bad = good, bad
        self.counters = bad.counters
        self.errors: list[TransportError] = []

    def register(self, reg: Registration) -> Any:
        return self.good.register(reg)

    def work(self, run_id: str) -> Any:
        return self.good.work(run_id)

    def get_task(self, round: int, client_id: str | None = None) -> Any:
        try:
            return self.bad.get_task(round, client_id)
        except TransportError as e:
            self.errors.append(e)
            raise

    def push_update(self, msg: Any) -> int:
        return self.bad.push_update(msg)

    def split_step(self, msg: Any) -> Any:
        return self.bad.split_step(msg)


def test_unauthenticated_client_fails_alone_and_round_applies(rounds: Any) -> None:
    cfg = config_from_dict(
        {
            "data": {"name": "digits", "max_train": 200},
            "model": {"name": "mlp", "hidden": 8},
            "rounds": {
                "count": 1,
                "num_clients": 3,
                "clients_per_round": 3,
                "min_clients": 2,
                "timeout_s": 3.0,
            },
            "compression": {"uplink": {"policy": "fixed", "bits": 4}},
        }
    )
    split = load_data(cfg)
    parts = client_partitions(cfg, split.train)
    server = FedServer(cfg, build_bundle(cfg, split.train), split.test)
    shards = {client_name(i): Shard(split.train, p) for i, p in enumerate(parts)}
    tokens = {c: secrets.token_hex(8) for c in shards}
    before = {k: v.clone() for k, v in server.global_state.items()}
    odd: list[_WrongTokenForData] = []
    refused: list[TransportError] = []

    def connect(principal: str, address: str) -> Any:
        good = TransportClient(address, client_id=principal, token=tokens[principal], timeout=10)
        if principal != client_name(1):
            return good
        bad = TransportClient(address, client_id=principal, token="wrong", timeout=10)
        # a process with the wrong token cannot even register: refused, nothing else said
        reg = Registration((ClientInfo(principal, len(parts[1])),), fedq_version=__version__)
        with pytest.raises(TransportError) as e:
            bad.register(reg)
        refused.append(e.value)
        odd.append(_WrongTokenForData(good, bad))
        return odd[0]

    engine, hooks, nodes = rounds(cfg, server, shards, grpc=True, tokens=tokens, connect=connect)
    assert refused[0].code == "UNAUTHENTICATED"
    (err,) = odd[0].errors
    assert err.code == "UNAUTHENTICATED"
    stats = {n.clients[0].client_id: n.stats for n in nodes}
    assert stats[client_name(1)]["failed"] == 1 and stats[client_name(1)]["tasks"] == 0
    assert stats[client_name(0)]["tasks"] == stats[client_name(2)]["tasks"] == 1
    (rec,) = hooks.records
    assert rec["applied"] and rec["clients_selected"] == 3 and rec["clients_ok"] == 2
    assert rec["clients_dropped"] == 1 and list(rec["dropped"]) == [client_name(1)]
    assert engine.error is None and hooks.reason == "completed 1 rounds"
    assert any(not torch.equal(server.global_state[k], v) for k, v in before.items())
