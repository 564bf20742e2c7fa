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
    return {"round": r, "bytes_up": 100, "bytes_down": 10, "clients_selected": 2,
            "steps": [{"round": r, "step": 0}, {"round": r, "step": 1}]}  # fmt: skip


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
