"""Parity: identity codec == no compression; the same rounds in process and over gRPC agree."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import torch

from fedq.config import RunConfig, config_from_dict
from fedq.fed.client import ClientWorker, client_seed
from fedq.fed.server import FedServer, client_name
from fedq.fed.strategy import weighted_mean
from fedq.fed.train import local_train
from fedq.runtime.setup import build_bundle, client_partitions, load_data
from fedq.transport import ByteCounter, TransportClient, TransportServer
from fedq.transport.loopback import LoopbackConnection


def _cfg(**up: Any) -> RunConfig:
    return config_from_dict(
        {
            "seed": 3,
            "data": {"name": "digits", "partition": "dirichlet", "alpha": 0.5, "max_train": 400},
            "model": {"name": "mlp", "hidden": 16},
            "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
            "fed": {"num_clients": 4, "clients_per_round": 3, "rounds": 2},
            "compression": {"uplink": up or {"policy": "none"}, "downlink": {"policy": "none"}},
        }
    )


def _parts(cfg: RunConfig) -> tuple[Any, list[torch.Tensor]]:
    split = load_data(cfg)
    return split, client_partitions(cfg, split.train)


def _run(cfg: RunConfig, over_grpc: bool) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    split, parts = _parts(cfg)
    server = FedServer(cfg, build_bundle(cfg, split.train), split.test, [len(p) for p in parts])
    tokens = {client_name(i): secrets.token_hex(8) for i in range(cfg.fed.num_clients)}
    counters = ByteCounter()
    transport = TransportServer(server, tokens=tokens) if over_grpc else None
    if transport is not None:
        transport.start()

    def connect(name: str) -> Any:
        if transport is not None:
            return TransportClient(transport.address, client_id=name, token=tokens[name])
        return LoopbackConnection(server, client_id=name, counters=counters)

    worker = ClientWorker(cfg, build_bundle(cfg, split.train), split.train, parts, connect)
    records = []
    try:
        for r in range(cfg.fed.rounds):
            ids = server.open_round(r)
            results = worker.run_round(r, ids)
            rec = server.close_round()
            traffic = (transport.counters if transport is not None else counters).take()
            rec.update(bytes_up=traffic["bytes_up"], bytes_down=traffic["bytes_down"])
            rec["client_up"] = sum(x["wire_up"] for x in results)
            rec["client_down"] = sum(x["wire_down"] for x in results)
            assert all(x["ok"] for x in results)
            records.append(rec)
    finally:
        if transport is not None:
            transport.stop(0.1)
    return server.global_state, records


def _reference(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Plain FedAvg with no codec, no wire, no server class: the 'no compression' baseline."""
    split, parts = _parts(cfg)
    bundle = build_bundle(cfg, split.train)
    global_state = {k: v.detach().clone() for k, v in bundle.trainable_state().items()}
    server = FedServer(cfg, bundle, split.test, [len(p) for p in parts])  # only for select()
    for r in range(cfg.fed.rounds):
        ids = server.strategy.select(r, cfg.fed.num_clients, cfg.fed.clients_per_round, cfg.seed)
        updates = []
        for cid in ids:
            bundle.load_trainable_state(global_state)
            gen = torch.Generator().manual_seed(client_seed(cfg.seed, cid, r))
            local_train(bundle, split.train, parts[cid], cfg.train, generator=gen)
            trained = bundle.trainable_state()
            delta = {k: trained[k].detach().float() - global_state[k].float() for k in trained}
            updates.append((delta, float(len(parts[cid]))))
        mean = weighted_mean(updates)
        global_state = {k: v + mean[k] for k, v in global_state.items()}
    return global_state


def test_identity_codec_equals_no_compression() -> None:
    cfg = _cfg()
    state, _ = _run(cfg, over_grpc=False)
    ref = _reference(cfg)
    assert state.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(state[k], ref[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "uplink",
    [{"policy": "fixed", "bits": 3, "error_feedback": True, "stochastic": True}],
    ids=["3bit-ef-stochastic"],
)
def test_in_process_and_grpc_agree_bit_for_bit_and_byte_for_byte(uplink: dict[str, Any]) -> None:
    cfg = _cfg(**uplink)
    state_local, rec_local = _run(cfg, over_grpc=False)
    state_grpc, rec_grpc = _run(cfg, over_grpc=True)
    for k in state_local:
        assert torch.equal(state_local[k], state_grpc[k]), k
    for a, b in zip(rec_local, rec_grpc, strict=True):
        assert a["bytes_up"] == b["bytes_up"] > 0
        assert a["bytes_down"] == b["bytes_down"] > 0
        # what the clients' transports counted equals what the server's transport counted
        assert b["client_up"] == b["bytes_up"] and b["client_down"] == b["bytes_down"]
        assert a["accuracy"] == b["accuracy"]


def test_compression_changes_bytes_not_shapes() -> None:
    _, rec_fp32 = _run(_cfg(), over_grpc=False)
    _, rec_4bit = _run(_cfg(policy="fixed", bits=4), over_grpc=False)
    # 4-bit codes + per-channel metadata: the uplink shrinks by well over 4x vs raw fp32
    assert rec_4bit[0]["bytes_up"] * 4 < rec_fp32[0]["bytes_up"]
    assert rec_4bit[0]["bytes_down"] == rec_fp32[0]["bytes_down"]  # downlink uncompressed in both
