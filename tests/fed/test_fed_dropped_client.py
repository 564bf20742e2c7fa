"""A client with a wrong token (or one that drops) fails alone with a clear reason; the round is
applied from the others, and the server keeps serving."""

from __future__ import annotations

import secrets
from typing import Any

import torch

from fedq.config import config_from_dict
from fedq.fed.client import ClientWorker
from fedq.fed.server import FedServer, client_name
from fedq.runtime.setup import build_bundle, client_partitions, load_data
from fedq.transport import TransportClient, TransportServer


def test_unauthenticated_client_fails_alone_and_round_applies() -> None:
    cfg = config_from_dict(
        {
            "data": {"name": "digits", "max_train": 200},
            "model": {"name": "mlp", "hidden": 8},
            "fed": {"num_clients": 3, "clients_per_round": 3, "rounds": 1, "min_clients": 2},
            "compression": {"uplink": {"policy": "fixed", "bits": 4}},
        }
    )
    split = load_data(cfg)
    parts = client_partitions(cfg, split.train)
    server = FedServer(cfg, build_bundle(cfg, split.train), split.test, [len(p) for p in parts])
    tokens = {client_name(i): secrets.token_hex(8) for i in range(3)}
    before = {k: v.clone() for k, v in server.global_state.items()}
    with TransportServer(server, tokens=tokens) as transport:

        def connect(name: str) -> Any:
            token = "wrong" if name == client_name(1) else tokens[name]
            return TransportClient(transport.address, client_id=name, token=token, timeout=10)

        worker = ClientWorker(cfg, build_bundle(cfg, split.train), split.train, parts, connect)
        ids = server.open_round(0)
        results = {x["client"]: x for x in worker.run_round(0, ids)}
        rec = server.close_round()
    assert not results[1]["ok"] and "UNAUTHENTICATED" in results[1]["error"]
    assert results[0]["ok"] and results[2]["ok"]
    assert rec["applied"] and rec["clients_ok"] == 2
    assert any(not torch.equal(server.global_state[k], v) for k, v in before.items())
