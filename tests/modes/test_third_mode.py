"""A third mode added the way docs/design.md ("Adding a mode") says: one module's worth of code
(here, this file), registered with :func:`fedq.modes.register`, and a run of it through the same
``simulate`` as federated and split mode, on the in-process backend.

The toy mode, ``class_prior``, learns the class prior of the data: each selected client counts
the labels of its rows and uploads the counts; the server adds the round's counts to its own and
predicts the most frequent class. It asks the round engine for an in-round exchange in turns
(one step per client): in its turn a client asks how many rows the clients before it in the
round declared, and uploads that number with its counts, so the server can check that the
turns came in roster order whatever the timing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from fedq.config import ModeRules, RunConfig, config_from_dict
from fedq.errors import ConfigError, FedqError
from fedq.models import ModelEntry, add_model, remove_model
from fedq.modes import MODES, Mode, get_mode, register, unregister
from fedq.rounds.node import Connection, TaskRunner
from fedq.rounds.workload import (
    Member,
    NoPrivacy,
    RoundPolicy,
    TakeTurns,
    Update,
    Workload,
)
from fedq.wire.control import Assignment, Joined
from fedq.wire.message import WireMessage

NAME = "class_prior"
MODEL = "prior_table"


class PriorServer:
    """The workload: the class counts so far; the model predicts the most frequent class."""

    def __init__(self, num_classes: int, test_labels: torch.Tensor) -> None:
        self.ledger = NoPrivacy()
        self.counts = [0] * num_classes
        self.test_labels = test_labels
        self._before = 0  # rows the members before the current turn declared (this round)
        self._turns: list[str] = []

    def info(self) -> dict[str, Any]:
        return {"trainable_params": len(self.counts)}

    def open_round(self, r: int, selected: Sequence[Member]) -> None:
        self._before, self._turns = 0, []

    def task(self, r: int, member: Member) -> WireMessage:
        return WireMessage.global_model(member.client_id, r, scalars={"classes": len(self.counts)})

    def exchange(self, r: int, member: Member, msg: WireMessage) -> WireMessage:
        before = self._before
        self._before += member.num_examples
        self._turns.append(member.client_id)
        # the exchange's reply is of kind "gradients", its request "activations" (the wire's
        # kinds of Split.Step), whatever a mode exchanges
        return WireMessage.gradients(member.client_id, r, msg.step, scalars={"rows_before": before})

    def accept(self, r: int, member: Member, msg: WireMessage) -> Update:
        counts = [msg.scalars.get(f"count_{c}", -1.0) for c in range(len(self.counts))]
        if min(counts) < 0 or sum(counts) != member.num_examples:
            raise FedqError(f"{member.client_id}: the counts do not add up to its rows")
        tensors = {"counts": torch.tensor(counts)}
        return Update(member, tensors, float(member.num_examples), dict(msg.scalars))

    def close_round(self, r: int, updates: Sequence[Update], apply: bool) -> dict[str, Any]:
        if apply:
            for u in updates:
                for c, n in enumerate(u.tensors["counts"].tolist()):
                    self.counts[c] += int(n)
        best = max(range(len(self.counts)), key=lambda c: self.counts[c])
        accuracy = float((self.test_labels == best).float().mean())
        return {
            "accuracy": accuracy,
            "turns": list(self._turns),
            "rows_before": {u.member.client_id: u.scalars["rows_before"] for u in updates},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = [int(n) for n in state["counts"]]


class PriorClient:
    """The client runner: count the labels of a shard, take the turn, upload."""

    def __init__(self, shards: Mapping[str, Any]) -> None:
        self.shards = dict(shards)

    def run(self, task: Assignment, conn: Connection) -> dict[str, Any]:
        cid, r = task.client_id, task.round
        got = conn.get_task(r, cid)
        shard = self.shards[cid]
        labels = shard.data.y[shard.idx]
        counts = torch.bincount(labels, minlength=int(got.scalars["classes"]))
        # one exchange per round (TakeTurns(1)): step r * 1 + 0
        turn = conn.split_step(WireMessage.activations(cid, r, r))
        scalars = {f"count_{c}": float(n) for c, n in enumerate(counts.tolist())}
        scalars["rows_before"] = turn.scalars["rows_before"]
        conn.push_update(WireMessage.update(cid, r, scalars=scalars))
        return {"examples": shard.size}

    def round_closed(self, r: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class ClassPriorMode(Mode):
    name = NAME
    rules = ModeRules(
        name=NAME,
        unused={
            "split": f"split learning settings; this scenario has mode {NAME!r}",
            "compression": f"mode {NAME!r} uploads label counts, uncompressed",
        },
        optimizer=("sgd", 0.0),
        privacy=("none",),
    )

    def server_workload(
        self, cfg: RunConfig, data: Any, num_classes: int, input_dim: int, device: torch.device
    ) -> Workload:
        return PriorServer(num_classes, data.test.y)

    def round_policy(self, cfg: RunConfig) -> RoundPolicy:
        return RoundPolicy(turns=TakeTurns(1))

    def client_runner(
        self, cfg: RunConfig, shards: Mapping[str, Any], joined: Joined, device: torch.device
    ) -> TaskRunner:
        return PriorClient(shards)

    def describe(self, cfg: RunConfig) -> str:
        return " | class prior"


@pytest.fixture
def third_mode() -> Iterator[Mode]:
    add_model(ModelEntry(MODEL, (NAME,)))
    mode = register(ClassPriorMode())
    try:
        yield mode
    finally:
        unregister(NAME)
        remove_model(MODEL)


SCENARIO = {
    "name": "toy",
    "mode": NAME,
    "data": {"name": "digits", "partition": "iid"},
    "model": {"name": MODEL},
    "rounds": {"count": 2, "num_clients": 4, "clients_per_round": 3, "min_clients": 3},
    "runtime": {"backend": "inprocess", "workers": 2},
}


def test_a_third_mode_runs_end_to_end_through_simulate(third_mode: Mode, tmp_path: Path) -> None:
    from fedq.runtime.simulate import simulate

    cfg = config_from_dict(SCENARIO)
    assert get_mode(cfg.mode) is third_mode and cfg.train.optimizer == "sgd"
    summary = simulate(cfg, tmp_path / "run")
    assert summary["mode"] == NAME and summary["rounds_applied"] == 2
    assert summary["stopped_reason"] is None and not summary["interrupted"]
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().split("\n") if x]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    declared = ckpt["server"]["declared"]  # each client's rows, as it registered them
    assert [r["round"] for r in records] == [0, 1]
    for rec in records:
        assert rec["applied"] and rec["clients_ok"] == 3
        # the engine ran the turns in roster order: each client was told the rows of those
        # before it in the round
        assert rec["turns"] == sorted(rec["turns"], key=lambda c: int(c.split("-")[1]))
        before, total = {}, 0
        for cid in rec["turns"]:
            before[cid] = total
            total += declared[cid]
        assert rec["rows_before"] == before
        assert 0.0 < rec["accuracy"] < 1.0 and rec["bytes_up"] > 0
    # the run folder is the usual one; config.json leaves out what the mode does not use
    saved = json.loads((run / "config.json").read_text())
    assert saved["mode"] == NAME and "compression" not in saved and "split" not in saved
    assert (run / "report.png").exists()
    assert not (run / "bit_maps.json").exists()  # split mode's file, not this one's
    assert ckpt["next_round"] == 2
    # the model: every label the clients of both rounds counted
    counted = sum(declared[c] for rec in records for c in rec["turns"])
    assert sum(ckpt["server"]["workload"]["counts"]) == counted


def test_the_third_mode_checks_its_own_keys_and_models(third_mode: Mode) -> None:
    from fedq.runtime.preflight import name_problems

    with pytest.raises(ConfigError, match=rf"compression: not used in mode '{NAME}'"):
        config_from_dict({**SCENARIO, "compression": {"uplink": {"bits": 4}}})
    with pytest.raises(ConfigError, match=r"privacy.mechanism: 'dpsgd' is not available"):
        config_from_dict({**SCENARIO, "privacy": {"mechanism": "dpsgd"}})
    cfg = config_from_dict({**SCENARIO, "model": {"name": "mlp"}})
    assert name_problems(cfg) == [
        f"model.name: unknown 'mlp' for mode {NAME!r}; registered: {MODEL}"
    ]
    assert MODEL not in get_mode("federated").model_names()


def test_a_mode_that_is_not_registered_any_more_is_refused() -> None:
    assert NAME not in MODES
    with pytest.raises(ConfigError, match=r"mode: must be one of 'federated' \| 'split'"):
        config_from_dict(SCENARIO)
    with pytest.raises(ConfigError, match=r"unknown mode 'class_prior'; registered modes: "):
        get_mode(NAME)
