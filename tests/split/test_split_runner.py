"""SplitFed runner (fedq simulate, mode: split), config validation, all-boundaries mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedq.config import config_from_dict, load_scenario
from fedq.errors import ConfigError
from fedq.report import read_metrics
from fedq.runtime.simulate import simulate
from fedq.split.protocol import LoopbackSplitConnection, SplitClientWorker, SplitServer

ROOT = Path(__file__).resolve().parents[2]


def test_split_section_is_validated_with_every_problem_named() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"mode": "split", "split": {"cut": 0, "b_min": 5, "b_max": 3,
                                                      "act_codec": "zip", "nope": 1,
                                                      "act_outlier_ratio": 0.5,
                                                      "reg_mode": "mean"}})  # fmt: skip
    text = "\n".join(e.value.problems)
    for key in ("split.cut", "split.b_min/b_max", "split.act_codec", "split.nope",
                "split.act_outlier_ratio", "split.reg_mode: unknown key"):  # fmt: skip
        assert key in text
    with pytest.raises(ConfigError, match="mode"):
        config_from_dict({"mode": "pipeline"})
    with pytest.raises(ConfigError, match=r"split\.act_gate_signal: must be one of"):
        config_from_dict({"mode": "split", "split": {"act_gate_signal": "hessian"}})


def test_simulate_split_writes_the_run_contract(tmp_path: Path) -> None:
    cfg = load_scenario(ROOT / "scenarios" / "split_tiny.yaml")
    summary = simulate(cfg, tmp_path)
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.png", "bits.jsonl",
                 "bit_maps.json"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
    recs = read_metrics(tmp_path)
    assert [r["round"] for r in recs] == [0, 1, 2]
    keys = ("step", "accuracy", "loss", "bytes_up", "bytes_down", "bytes_fp32", "mean_bits",
            "epsilon", "bits/cut/act/mean", "bits/cut/act/min", "bits/cut/grad/max")  # fmt: skip
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
def test_all_boundaries_quantizes_every_block_boundary(kit, signal: str) -> None:  # type: ignore[no-untyped-def]
    cfg = kit.tiny_cfg(all_boundaries=True, local_steps=2, b_min=1, target_bits=2.0,
                       act_gate_signal=signal)  # fmt: skip
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    worker = SplitClientWorker(cfg, kit.build(cfg), split.train, parts,
                               lambda n: LoopbackSplitConnection(server, n))  # fmt: skip
    assert len(worker.model.bottom.boundaries) == 1 and len(server.model.top.boundaries) == 1
    before = {k: v.clone() for k, v in server.client_state.items()}
    server.open_round(0, [0])
    out = worker.run_client(0, 0)
    summary = server.close_round(evaluate=False)
    # 4 blocks, cut after 2: boundaries b0 (client side), cut, b1 (server side), both directions
    for b in ("b0", "cut", "b1"):
        for d in ("act", "grad"):
            assert f"bits/{b}/{d}/mean" in summary
    step = out["steps"][-1]
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


def test_importing_split_stays_light() -> None:
    import subprocess
    import sys

    heavy = ("transformers", "peft", "ray")
    code = (
        "import sys, fedq.config, fedq.runtime.split_runner, fedq.split.protocol; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
