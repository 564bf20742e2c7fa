"""Ctrl-C keeps finished rounds; resuming continues to exactly the uninterrupted result, in
federated and in split mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedq.config import RunConfig, config_from_dict
from fedq.errors import ConfigError
from fedq.runtime.simulate import simulate


def _cfg() -> RunConfig:
    return config_from_dict(
        {
            "seed": 1,
            "data": {"name": "digits", "max_train": 300},
            "model": {"name": "mlp", "hidden": 16},
            "rounds": {"count": 4, "num_clients": 4, "clients_per_round": 2},
            "compression": {
                "uplink": {
                    "policy": "fixed",
                    "bits": 3,
                    "error_feedback": True,
                    "stochastic": True,
                },
                "downlink": {"policy": "fixed", "bits": 6},
            },
            "runtime": {"backend": "inprocess", "workers": 2},
        }
    )


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_interrupt_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    full = simulate(_cfg(), tmp_path / "full")

    def stop_after_round_1(rec: dict[str, Any]) -> None:
        if rec["round"] == 1:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    partial = simulate(_cfg(), part, on_round=stop_after_round_1)
    assert partial["interrupted"] is True
    assert [r["round"] for r in _records(part)] == [0, 1]
    assert (part / "summary.json").exists() and (part / "report.png").exists()

    resumed = simulate(_cfg(), part, resume=True)
    assert [r["round"] for r in _records(part)] == [0, 1, 2, 3]
    assert resumed["final_accuracy"] == full["final_accuracy"]
    assert resumed["bytes_wire_total"] == full["bytes_wire_total"]
    # what the clients counted adds up across the restart too (it is in the checkpoint)
    for key in ("client_bytes_up", "client_bytes_down"):
        assert resumed[key] == full[key] > 0, key
    assert resumed["client_bytes_up"] == resumed["bytes_up_total"]
    a, b = _records(tmp_path / "full"), _records(part)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[-1]["cum_bytes"] == b[-1]["cum_bytes"]


def _split_cfg(act_codec: str) -> RunConfig:
    return config_from_dict(
        {
            "mode": "split",
            "seed": 4,
            "name": "split-resume",
            "data": {
                "name": "rotten_tomatoes",
                "partition": "iid",
                "max_train": 96,
                "max_test": 16,
            },
            "model": {"name": "tiny_bert_lora", "hidden": 32, "lora_r": 4, "max_length": 16},
            "train": {"batch_size": 8, "lr": 0.01, "optimizer": "adamw"},
            "rounds": {"count": 4, "num_clients": 3, "clients_per_round": 2},
            "split": {
                "cut": 1,
                "tiny_layers": 2,
                "local_steps": 2,
                "act_codec": act_codec,
                "grad_codec": "amaq",
                "fixed_bits": 3,
            },
            "runtime": {"backend": "inprocess", "workers": 2},
        }
    )


def _steps(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (out / "bits.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # all but the timing


@pytest.mark.parametrize("act_codec", ["amaq", "fixed"])
def test_split_interrupt_then_resume_matches_uninterrupted(tmp_path: Path, act_codec: str) -> None:
    """The split server's state (top LoRA, its optimizer and gates, the gradient codec and its
    rounding generator, the averaged client state) and each worker's client state are in the
    checkpoint, and split steps run in a fixed order: the resumed run is the uninterrupted one.
    (AQ-SGD re-synchronises its copies after a restart instead: not exact, not tested here.)"""
    full = simulate(_split_cfg(act_codec), tmp_path / "full")

    def stop_after_round_1(rec: dict[str, Any]) -> None:
        if rec["round"] == 1:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    assert simulate(_split_cfg(act_codec), part, on_round=stop_after_round_1)["interrupted"]
    assert [r["round"] for r in _records(part)] == [0, 1]
    resumed = simulate(_split_cfg(act_codec), part, resume=True)
    a, b = _records(tmp_path / "full"), _records(part)
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    for key in (
        "train_loss",
        "bytes_up",
        "bytes_down",
        "cum_bytes",
        "mean_bits",
        "accuracy",
        "loss",
        "bits/cut/act/mean",
        "bits/cut/grad/mean",
    ):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    assert _steps(tmp_path / "full") == _steps(part)  # every step: loss, bytes, bits
    assert resumed["final_accuracy"] == full["final_accuracy"]
    assert resumed["bytes_wire_total"] == full["bytes_wire_total"]
    maps = [json.loads((d / "bit_maps.json").read_text()) for d in (tmp_path / "full", part)]
    assert maps[0] == maps[1]


def test_a_run_stopped_before_its_first_round_resumes_from_the_start(tmp_path: Path) -> None:
    """The run folder is resumable as soon as the server runs (a checkpoint of round 0 with the
    run id and the initial model): a run stopped before round 0 ends resumes to the
    uninterrupted result, and its wall seconds include the first process's."""
    full = simulate(_cfg(), tmp_path / "full")

    def stop_at_start(info: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    part = tmp_path / "part"
    first = simulate(_cfg(), part, on_start=stop_at_start)
    assert first["interrupted"] and first["rounds_completed"] == 0
    resumed = simulate(_cfg(), part, resume=True)
    assert [r["round"] for r in _records(part)] == [0, 1, 2, 3]
    assert [r["loss"] for r in _records(tmp_path / "full")] == [r["loss"] for r in _records(part)]
    assert resumed["final_accuracy"] == full["final_accuracy"]
    assert resumed["bytes_wire_total"] == full["bytes_wire_total"]
    assert resumed["wall_seconds"] > first["wall_seconds"] > 0


def test_discarded_rounds_are_counted_and_the_run_still_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every client fails in round 1 (discarded), rounds 0, 2 and 3 are applied: summary.json
    counts them and the command line's exit status is 0."""
    from fedq.cli import _print_summary
    from fedq.errors import FedqError
    from fedq.fed.client import ClientWorker

    run = ClientWorker.run

    def fails_in_round_1(self: ClientWorker, task: Any, conn: Any) -> dict[str, Any]:
        if task.round == 1:
            raise FedqError("the disk is full")
        return run(self, task, conn)

    monkeypatch.setattr(ClientWorker, "run", fails_in_round_1)
    summary = simulate(_cfg(), tmp_path / "run")
    assert [r["applied"] for r in _records(tmp_path / "run")] == [True, False, True, True]
    assert (
        summary["rounds_completed"],
        summary["rounds_applied"],
        summary["rounds_discarded"],
    ) == (4, 3, 1)
    assert summary["stopped_reason"] is None
    assert _print_summary(summary, tmp_path / "run") == 0
    assert "| 4 rounds, 3 applied (1 discarded) |" in capsys.readouterr().out


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no checkpoint\.pt"):
        simulate(_cfg(), tmp_path / "nothing", resume=True)
