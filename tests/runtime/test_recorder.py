"""A round's checkpoint is written before its log lines and carries them: a round in
metrics.jsonl can always be resumed after, and a run that died between a checkpoint and its lines
gets them back on resume (records, split steps, cumulative bytes), never twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fedq.runtime.recorder as recorder_mod
from fedq.config import load_scenario
from fedq.runtime.checkpoint import load_checkpoint
from fedq.runtime.recorder import BITS_FILE, RunRecorder

ROOT = Path(__file__).resolve().parents[2]


def _rounds(path: Path) -> list[int]:
    return [json.loads(x)["round"] for x in path.read_text().splitlines()]


def _record(r: int) -> dict[str, Any]:
    return {
        "round": r,
        "bytes_up": 100,
        "bytes_down": 10,
        "clients_selected": 2,
        "steps": [{"round": r, "step": 0}, {"round": r, "step": 1}],
    }


def test_a_run_that_died_before_logging_its_checkpointed_round_gets_the_lines_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_scenario(ROOT / "scenarios" / "quickstart.yaml")
    rec = RunRecorder(tmp_path, cfg)
    seen: list[list[int]] = []
    save = recorder_mod.save_checkpoint

    def spy(out: Path, state: dict[str, Any]) -> Path:  # what is logged when the checkpoint lands
        seen.append(_rounds(out / "metrics.jsonl"))
        return save(out, state)

    monkeypatch.setattr(recorder_mod, "save_checkpoint", spy)
    for r in range(2):
        rec.round(_record(r), 0.0)
        rec.checkpoint({"next_round": r + 1})
    assert seen == [[], [0]]  # each round's checkpoint came before its line

    def killed(entry: dict[str, Any]) -> None:
        raise KeyboardInterrupt  # the process dies after round 2's checkpoint, before its lines

    rec.round(_record(2), 0.0)
    monkeypatch.setattr(rec, "_write", killed)
    with pytest.raises(KeyboardInterrupt):
        rec.checkpoint({"next_round": 3})
    rec.writer.close()
    assert _rounds(tmp_path / "metrics.jsonl") == [0, 1]

    ckpt = load_checkpoint(tmp_path)
    resumed = RunRecorder(tmp_path, cfg, resume_round=3, last_round=ckpt["log"])
    assert _rounds(tmp_path / "metrics.jsonl") == [0, 1, 2]
    assert _rounds(tmp_path / BITS_FILE) == [0, 0, 1, 1, 2, 2]
    assert resumed.cum_bytes == 3 * 110
    resumed.round(_record(3), 0.0)
    resumed.checkpoint({"next_round": 4})
    resumed.writer.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["cum_bytes"]) for r in rows] == [(0, 110), (1, 220), (2, 330), (3, 440)]

    again = RunRecorder(tmp_path, cfg, resume_round=4, last_round=load_checkpoint(tmp_path)["log"])
    again.writer.close()  # the checkpoint's round is logged already: not written twice
    assert _rounds(tmp_path / "metrics.jsonl") == [0, 1, 2, 3]
    assert again.cum_bytes == 440


class _Clock:
    """A stand-in for time.perf_counter that the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("how", ["killed", "interrupted"])
def test_wall_seconds_cover_every_process_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Process 1 checkpoints round 0 at 10 s and ends at 15 s (killed: no summary; interrupted:
    its summary says 15 s); process 2 resumes and runs 30 s. The run took 10 + 30 s when the
    first was killed (its time after the checkpoint is unknown), 15 + 30 s when interrupted."""
    clock = _Clock()
    monkeypatch.setattr(recorder_mod.time, "perf_counter", clock)
    cfg = load_scenario(ROOT / "scenarios" / "quickstart.yaml")
    first = RunRecorder(tmp_path, cfg)
    clock.now = 10.0
    first.round(_record(0), 0.0)
    first.checkpoint({"next_round": 1})
    clock.now = 15.0
    if how == "interrupted":
        assert first.finish({"interrupted": True}, None)["wall_seconds"] == 15.0
    else:
        first.writer.close()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["wall_seconds"] == 10.0
    clock.now = 100.0
    second = RunRecorder(
        tmp_path, cfg, resume_round=1, last_round=ckpt["log"], wall_before=ckpt["wall_seconds"]
    )
    clock.now = 130.0
    summary = second.finish({"interrupted": False, "stopped_reason": None}, None)
    assert summary["wall_seconds"] == (40.0 if how == "killed" else 45.0)
    assert summary["rounds_applied"] == 1 and summary["stopped_reason"] is None


def test_the_round_log_journals_records_checkpoints_then_reports_each_round(
    tmp_path: Path,
) -> None:
    """RoundLog, the hooks fedq serve gives its engine and the simulate driver feeds: a privacy
    charge is journaled; a closed round is completed, its checkpoint written (next round) before
    its lines, and only then reported; the end is kept typed."""
    import torch

    from fedq.rounds.workload import Ending, RunOutcome
    from fedq.runtime.checkpoint import PRIVACY_FILE
    from fedq.runtime.recorder import RoundLog

    cfg = load_scenario(ROOT / "scenarios" / "quickstart.yaml")
    rec = RunRecorder(tmp_path, cfg)
    order: list[str] = []

    def checkpoint(next_round: int) -> None:
        assert not (tmp_path / "metrics.jsonl").read_text()  # the lines come after it
        order.append(f"checkpoint {next_round}")
        rec.checkpoint({"next_round": next_round})

    def reported(record: dict[str, Any]) -> None:
        assert _rounds(tmp_path / "metrics.jsonl") == [record["round"]]
        order.append(f"round {record['round']} bytes {record['cum_bytes']}")

    log = RoundLog(rec, checkpoint, reported)
    log.on_open(0, {})  # no privacy: nothing to journal
    assert not (tmp_path / PRIVACY_FILE).exists()
    log.on_open(0, {"spent": 1.5})
    journal = torch.load(tmp_path / PRIVACY_FILE, weights_only=True)
    assert (journal["round"], journal["ledger"]) == (0, {"spent": 1.5})
    log.on_round(_record(0))
    assert order == ["checkpoint 1", "round 0 bytes 110"]
    assert load_checkpoint(tmp_path)["next_round"] == 1
    assert not log.done.is_set() and log.outcome is None
    log.on_done(RunOutcome(Ending.BUDGET, "the privacy budget is spent"))
    assert log.done.is_set() and log.outcome is not None
    assert log.outcome.stopped_reason == "the privacy budget is spent"
