"""Evaluation on the sites' own rows (``data.site_holdout``): each client keeps a seeded share of
its rows out of training and, in an evaluation round, measures the model it received on them;
the server reports each site and the pooled figure, in roster order."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from fedq.config import load_scenario
from fedq.data.datasets import Shard, TextDataset
from fedq.fed.client import site_holdout
from fedq.fed.server import site_metrics
from fedq.rounds.workload import Member, Update

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


def _shard(n: int) -> Shard:
    data = TextDataset([f"row {i}" for i in range(40)], torch.zeros(40, dtype=torch.long), 1, "t")
    return Shard(data, torch.arange(40 - n, 40))


def test_the_held_out_rows_are_a_seeded_disjoint_share_of_the_shard() -> None:
    cfg = load_scenario(QUICKSTART, ["data.site_holdout=0.25"])
    train, held = site_holdout(_shard(20), cfg, index=3)
    assert held is not None and (train.size, held.size) == (15, 5)
    rows = sorted(train.idx.tolist() + held.idx.tolist())
    assert rows == list(range(20, 40)) and train.idx.tolist() == sorted(train.idx.tolist())
    _, held_again = site_holdout(_shard(20), cfg, index=3)
    assert held_again is not None and torch.equal(held_again.idx, held.idx)
    _, other = site_holdout(_shard(20), cfg, index=4)
    assert other is not None and not torch.equal(other.idx, held.idx)
    assert site_holdout(_shard(1), cfg, index=3)[1] is None  # nothing would be left to train
    whole, none = site_holdout(_shard(20), load_scenario(QUICKSTART), index=3)
    assert none is None and whole.size == 20


def _update(index: int, **scalars: float) -> Update:
    member = Member(f"client-{index}", index, 10)
    return Update(member, {}, 1.0, dict(scalars), 0)


def test_sites_are_pooled_by_rows_in_roster_order() -> None:
    ups = [
        _update(2, site_loss=1.0, site_count=10, site_correct=4),
        _update(0, site_loss=0.5, site_count=30, site_correct=27),
        _update(1, loss=0.1),  # not an evaluation of its own rows
        _update(3, site_loss=9.0, site_count=0.5),  # not a row count: left out
    ]
    out = site_metrics(ups, "classification")
    assert list(out["site_eval"]) == ["client-0", "client-2"]
    assert out["site_eval"]["client-2"] == {"loss": 1.0, "count": 10, "accuracy": 0.4}
    assert out["site_loss"] == pytest.approx((0.5 * 30 + 1.0 * 10) / 40)
    assert out["site_accuracy"] == pytest.approx(31 / 40)
    lm = site_metrics([_update(0, site_loss=2.0, site_count=7)], "causal_lm")
    assert lm["site_perplexity"] == pytest.approx(torch.tensor(2.0).exp().item())
    assert site_metrics([_update(0, loss=1.0)], "classification") == {}


def test_a_run_reports_what_each_site_measured_on_its_own_rows(
    fedq_cli: Any, tmp_path: Path
) -> None:
    """The README's command (in two rounds, the model sent uncompressed): round 0's figures are
    the initial model on each selected client's held-out rows, recomputed in this process; the
    console shows the last pooled one."""
    from fedq.fed.train import evaluation
    from fedq.runtime.setup import build_bundle, client_partitions, load_data

    text = (ROOT / "README.md").read_text()
    line = next(
        x for x in text.splitlines() if x.startswith("fedq simulate") and "site_holdout" in x
    )
    shown = shlex.split(line)
    assert shown[:3] == ["fedq", "simulate", "scenarios/quickstart.yaml"]
    assert shown[-2] == "--out", shown
    run = tmp_path / "run"
    sets = ["rounds.count=2", "runtime.backend=inprocess", "compression.downlink.policy=none"]
    args = [x for s in sets for x in ("--set", s)]
    done = fedq_cli(*shown[1:-2], *args, "--out", str(run))  # the README's, in fewer rounds
    assert done.returncode == 0, done.stdout + done.stderr
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = recs[0]
    assert len(first["site_eval"]) == first["clients_ok"] == 5
    last = recs[-1]["site_accuracy"]
    assert f"(sites' own rows: accuracy {last:.4f})" in done.stdout, done.stdout
    cfg = load_scenario(run / "config.json")
    split = load_data(cfg)
    parts = client_partitions(cfg, split.train)
    initial = build_bundle(cfg, split.train)
    for cid, got in first["site_eval"].items():
        index = int(cid.split("-")[1])
        _, held = site_holdout(Shard(split.train, parts[index]), cfg, index)
        assert held is not None and got["count"] == held.size
        want = evaluation(initial, split.train.subset(held.idx))
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["accuracy"] == pytest.approx(want["accuracy"])
    pooled = sum(s["accuracy"] * s["count"] for s in first["site_eval"].values())
    assert first["site_accuracy"] == pytest.approx(
        pooled / sum(s["count"] for s in first["site_eval"].values())
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last_site_accuracy"] == recs[-1]["site_accuracy"]


def test_split_mode_refuses_site_holdout(fedq_cli: Any, tmp_path: Path) -> None:
    done = fedq_cli(
        "simulate",
        str(ROOT / "scenarios" / "split_tiny.yaml"),
        "--set",
        "data.site_holdout=0.1",
        "--out",
        str(tmp_path / "run"),
        "-q",
    )
    assert done.returncode == 2
    assert "data.site_holdout: not used in mode 'split'" in done.stderr, done.stderr
