"""SplitFed through fedq simulate (mode: split) and the round engine, config validation,
all-boundaries mode, and split runs being reproducible."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedq.codec import raw
from fedq.config import config_from_dict, load_scenario
from fedq.errors import ConfigError, FedqError
from fedq.report import read_metrics
from fedq.runtime.simulate import simulate
from fedq.split.protocol import SplitClientWorker, SplitServer
from fedq.wire import WireMessage

ROOT = Path(__file__).resolve().parents[2]


def test_split_section_is_validated_with_every_problem_named() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(
            {
                "mode": "split",
                "split": {
                    "cut": 0,
                    "b_min": 5,
                    "b_max": 3,
                    "act_codec": "zip",
                    "nope": 1,
                    "act_outlier_ratio": 0.5,
                    "reg_mode": "mean",
                },
            }
        )
    text = "\n".join(e.value.problems)
    for key in (
        "split.cut",
        "split.b_min/b_max",
        "split.act_codec",
        "split.nope",
        "split.act_outlier_ratio",
        "split.reg_mode: unknown key",
    ):
        assert key in text
    with pytest.raises(ConfigError, match="mode"):
        config_from_dict({"mode": "pipeline"})
    with pytest.raises(ConfigError, match=r"split\.act_gate_signal: must be one of"):
        config_from_dict({"mode": "split", "split": {"act_gate_signal": "hessian"}})


def test_simulate_split_writes_the_run_contract(tmp_path: Path) -> None:
    cfg = load_scenario(ROOT / "scenarios" / "split_tiny.yaml")
    summary = simulate(cfg, tmp_path)
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "report.png",
        "bits.jsonl",
        "bit_maps.json",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    recs = read_metrics(tmp_path)
    assert [r["round"] for r in recs] == [0, 1, 2]
    keys = (
        "step",
        "accuracy",
        "loss",
        "bytes_up",
        "bytes_down",
        "bytes_fp32",
        "mean_bits",
        "epsilon",
        "bits/cut/act/mean",
        "bits/cut/act/min",
        "bits/cut/grad/max",
    )
    for key in keys:
        assert key in recs[-1], key
    # the bits fall under the regularizer, and bytes with them
    assert recs[-1]["mean_bits"] < recs[0]["mean_bits"] <= 8
    assert recs[-1]["step_bytes_up"] < recs[0]["step_bytes_up"]
    for d in ("act", "grad"):  # metadata (scales, bit maps, row scales) is on top of the codes
        assert recs[-1][f"{d}_bits"] < recs[-1][f"{d}_wire_bits"] < recs[-1][f"{d}_bits"] + 4
    assert summary["bytes_wire_total"] == sum(r["bytes_up"] + r["bytes_down"] for r in recs)
    assert summary["compression_ratio"] > 1.5
    steps = [json.loads(x) for x in (tmp_path / "bits.jsonl").read_text().splitlines()]
    assert len(steps) == 3 * 2 * 4  # rounds x clients x local steps, one row each
    maps = json.loads((tmp_path / "bit_maps.json").read_text())
    assert set(maps) == {"cut/act", "cut/grad"} and len(maps["cut/act"]) == 32


@pytest.mark.parametrize("signal", ["task", "fisher"])
def test_all_boundaries_quantizes_every_block_boundary(kit, rounds, signal: str) -> None:  # type: ignore[no-untyped-def]
    cfg = kit.tiny_cfg(
        all_boundaries=True,
        local_steps=2,
        b_min=1,
        target_bits=2.0,
        act_gate_signal=signal,
        rounds={"count": 1, "num_clients": 1, "clients_per_round": 1},
    )
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    before = {k: v.clone() for k, v in server.client_state.items()}
    _, hooks, nodes = rounds(cfg, server, kit.shards(cfg, split, parts), grpc=False)
    (summary,) = hooks.records
    assert summary["applied"] and summary["clients_ok"] == 1
    worker = nodes[0].runner
    assert len(worker.model.bottom.boundaries) == 1 and len(server.model.top.boundaries) == 1
    # 4 blocks, cut after 2: boundaries b0 (client side), cut, b1 (server side), both directions
    for b in ("b0", "cut", "b1"):
        for d in ("act", "grad"):
            assert f"bits/{b}/{d}/mean" in summary
    step = summary["steps"][-1]  # the server's row of the step, with what the client reported
    assert "bits/b0/act/mean" in step and "bits/b0/grad/mean" in step
    inner = worker.model.bottom.boundaries[0]
    assert inner.last_act is not None and inner.last_grad is not None  # both directions coded
    # the inner gates trained (FedAvg'd state changed) and so did the server's
    for key in ("boundaries.0.act_q.gate", "act_q.gate"):  # inner boundary and the cut
        gate = server.client_state[key]
        assert not torch.equal(gate, before[key]), key
        assert float(gate.std()) > 0, key  # not the projection alone: it moves all by one shift
    top_b: Any = server.model.top.boundaries[0]
    assert top_b.act_q.gate.grad is None  # zeroed after its step


def test_split_rounds_in_process_and_over_grpc_agree_bit_for_bit(kit, rounds) -> None:  # type: ignore[no-untyped-def]
    """Two clients in two processes step concurrently; the engine runs their steps in roster
    order, so the shared top sees the same sequence whatever the timing: loopback and gRPC give
    the same model, losses and bytes."""
    cfg = kit.tiny_cfg()  # AMAQ both ways: learned bits, stochastic rounding of the gradients
    split, parts = kit.data(cfg)
    runs = []
    for over_grpc in (False, True):
        server = SplitServer(cfg, kit.build(cfg), split.test, 2)
        _, hooks, _ = rounds(cfg, server, kit.shards(cfg, split, parts), grpc=over_grpc)
        runs.append((server, hooks.records))
    (a, rec_a), (b, rec_b) = runs
    for k, v in a.client_state.items():
        assert torch.equal(v, b.client_state[k]), k
    top_b = dict(b.model.top.named_parameters())
    for n, p in a.model.top.named_parameters():
        assert torch.equal(p, top_b[n]), n
    assert len(rec_a) == len(rec_b) == 2
    for x, y in zip(rec_a, rec_b, strict=True):
        assert x["applied"] and y["applied"] and x["clients_ok"] == 2
        order = [(row["client"], row["step"]) for row in x["steps"]]
        r = x["round"]
        assert order == [(c, r * 2 + s) for c in ("client-0", "client-1") for s in range(2)]
        keys = ("client", "step", "loss", "bytes_up", "bytes_down", "act_bits", "grad_bits")
        assert [[row[k] for k in keys] for row in x["steps"]] == [
            [row[k] for k in keys] for row in y["steps"]
        ]
        for key in ("bytes_up", "bytes_down", "train_loss", "accuracy", "loss", "state_bytes"):
            assert x[key] == y[key], key


def test_the_engine_keeps_each_client_to_its_steps_in_order(kit, open_rounds) -> None:  # type: ignore[no-untyped-def]
    """A selected client's steps come in order, no more than the round has, and its client
    state only after the last one; anyone else's step is refused. Nothing refused reaches the
    server's top."""
    cfg = kit.tiny_cfg(
        act_codec="fixed",
        grad_codec="fixed",
        fixed_bits=4,
        local_steps=2,
        rounds={"count": 1, "num_clients": 3, "clients_per_round": 2},
    )
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    shards = kit.shards(cfg, split, parts)
    harness = open_rounds(cfg, server, {c: sh.size for c, sh in shards.items()})
    harness.engine.start()
    selected = [a.client_id for a in harness.next_task().tasks]
    (outsider,) = set(shards) - set(selected)
    cid = selected[0]
    conn = harness.connection()
    sent: list[Any] = []

    class Recording:  # the worker's connection, keeping what it sends
        def split_step(self, msg: Any) -> Any:
            sent.append(msg)
            return conn.split_step(msg)

    worker = SplitClientWorker(cfg, kit.build(cfg), shards, {c: int(c[-1]) for c in shards})
    opt = torch.optim.SGD([p for p in worker.model.bottom.parameters() if p.requires_grad], lr=0.0)
    noise = torch.Generator().manual_seed(0)
    take = shards[cid].idx[:8]

    def step(i: int) -> None:
        worker.step(Recording(), cid, shards[cid], opt, take, 0, i, None, None, noise)

    def top() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in server.model.top.named_parameters()}

    step(0)
    before, steps = top(), server.steps
    state = {k: raw(v) for k, v in server.client_state.items()}
    early = WireMessage.update(cid, 0, tensors=state, scalars={"num_samples": 8.0})
    refusals = [
        (lambda: step(0), "out of order"),  # a replay of step 0
        (lambda: step(2), "out of order"),  # skipping step 1
        (lambda: harness.engine.push_update(early), "after 1 of 2 steps"),
        (
            lambda: harness.engine.exchange(dataclasses.replace(sent[0], client_id=outsider)),
            "not selected",
        ),
        (
            lambda: harness.engine.exchange(dataclasses.replace(sent[0], round=1)),
            "round 1 is not open",
        ),
    ]
    for call, match in refusals:
        with pytest.raises(FedqError, match=match):
            call()
    assert server.steps == steps and all(torch.equal(v, top()[n]) for n, v in before.items())
    step(1)
    with pytest.raises(FedqError, match="has taken all 2 steps"):  # one step too many
        step(2)
    assert server.steps == steps + 1
    harness.engine.push_update(early)
    assert harness.engine._round.updates.keys() == {cid}


def test_importing_split_stays_light() -> None:
    import subprocess
    import sys

    heavy = ("transformers", "peft", "ray")
    code = (
        "import sys, fedq.config, fedq.runtime.simulate, fedq.runtime.hosts, fedq.rounds.engine, "
        "fedq.split.protocol; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
