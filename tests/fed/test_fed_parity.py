"""Parity: identity codec == no compression; the same rounds in process and over gRPC agree, and
the bytes the clients' transports counted are the bytes the server's transport counted."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import torch

from fedq.config import RunConfig, config_from_dict
from fedq.data.datasets import Shard
from fedq.fed.server import FedServer
from fedq.fed.train import local_train
from fedq.rounds import client_name, client_seed, select_clients, weighted_mean
from fedq.runtime.setup import build_bundle, client_partitions, load_data


def _cfg(**up: Any) -> RunConfig:
    return config_from_dict(
        {
            "seed": 3,
            "data": {"name": "digits", "partition": "dirichlet", "alpha": 0.5, "max_train": 400},
            "model": {"name": "mlp", "hidden": 16},
            "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
            "rounds": {"count": 2, "num_clients": 4, "clients_per_round": 3},
            "compression": {"uplink": up or {"policy": "none"}, "downlink": {"policy": "none"}},
        }
    )


def _parts(cfg: RunConfig) -> tuple[Any, list[torch.Tensor]]:
    split = load_data(cfg)
    return split, client_partitions(cfg, split.train)


def _run(
    cfg: RunConfig, over_grpc: bool, rounds: Any, metered: Any
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The rounds through the round engine and client nodes; each record gains ``client_up`` /
    ``client_down``: what the clients' own transports counted for that round."""
    split, parts = _parts(cfg)
    server = FedServer(cfg, build_bundle(cfg, split.train), split.test)
    shards = {client_name(i): Shard(split.train, p) for i, p in enumerate(parts)}
    tokens = {c: secrets.token_hex(8) for c in shards} if over_grpc else None
    conns: list[Any] = []

    def wrap(principal: str, conn: Any) -> Any:
        conns.append(metered(conn))
        return conns[-1]

    engine, hooks, _ = rounds(cfg, server, shards, grpc=over_grpc, tokens=tokens, wrap=wrap)
    assert engine.error is None and hooks.reason == f"completed {cfg.rounds.count} rounds"
    records = hooks.records
    assert [r["round"] for r in records] == list(range(cfg.rounds.count))
    calls = [c for m in conns for c in m.calls]
    for rec in records:
        mine = [c for c in calls if c["round"] == rec["round"]]
        assert {c["kind"] for c in mine} == {"task", "update"}
        assert len(mine) == 2 * cfg.rounds.clients_per_round  # one download, one upload each
        rec["client_up"] = sum(c["up"] for c in mine)
        rec["client_down"] = sum(c["down"] for c in mine)
        assert rec["applied"] and rec["clients_ok"] == cfg.rounds.clients_per_round
        assert rec["clients_dropped"] == 0 and rec["dropped"] == {}
    return server.global_state, records


def _reference(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Plain FedAvg with no codec, no wire, no server class: the 'no compression' baseline."""
    split, parts = _parts(cfg)
    bundle = build_bundle(cfg, split.train)
    global_state = {k: v.detach().clone() for k, v in bundle.trainable_state().items()}
    everyone = list(range(cfg.rounds.num_clients))
    for r in range(cfg.rounds.count):
        updates = []
        for cid in select_clients(r, everyone, cfg.rounds.clients_per_round, cfg.seed):
            bundle.load_trainable_state(global_state)
            gen = torch.Generator().manual_seed(client_seed(cfg.seed, cid, r))
            local_train(bundle, split.train, parts[cid], cfg.train, generator=gen)
            trained = bundle.trainable_state()
            delta = {k: trained[k].detach().float() - global_state[k].float() for k in trained}
            updates.append((delta, float(len(parts[cid]))))
        mean = weighted_mean(updates)
        global_state = {k: v + mean[k] for k, v in global_state.items()}
    return global_state


def test_identity_codec_equals_no_compression(rounds: Any, metered: Any) -> None:
    cfg = _cfg()
    state, _ = _run(cfg, False, rounds, metered)
    ref = _reference(cfg)
    assert state.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(state[k], ref[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "uplink",
    [{"policy": "fixed", "bits": 3, "error_feedback": True, "stochastic": True}],
    ids=["3bit-ef-stochastic"],
)
def test_in_process_and_grpc_agree_bit_for_bit_and_byte_for_byte(
    uplink: dict[str, Any], rounds: Any, metered: Any
) -> None:
    cfg = _cfg(**uplink)
    state_local, rec_local = _run(cfg, False, rounds, metered)
    state_grpc, rec_grpc = _run(cfg, True, rounds, metered)
    for k in state_local:
        assert torch.equal(state_local[k], state_grpc[k]), k
    for a, b in zip(rec_local, rec_grpc, strict=True):
        assert a["bytes_up"] == b["bytes_up"] > 0
        assert a["bytes_down"] == b["bytes_down"] > 0
        # what the clients' transports counted equals what the server's transport counted
        for rec in (a, b):
            assert rec["client_up"] == rec["bytes_up"] and rec["client_down"] == rec["bytes_down"]
        assert a["accuracy"] == b["accuracy"]


def test_compression_changes_bytes_not_shapes(rounds: Any, metered: Any) -> None:
    _, rec_fp32 = _run(_cfg(), False, rounds, metered)
    _, rec_4bit = _run(_cfg(policy="fixed", bits=4), False, rounds, metered)
    # 4-bit codes + per-channel metadata: the uplink shrinks by well over 4x vs raw fp32
    assert rec_4bit[0]["bytes_up"] * 4 < rec_fp32[0]["bytes_up"]
    assert rec_4bit[0]["bytes_down"] == rec_fp32[0]["bytes_down"]  # downlink uncompressed in both
