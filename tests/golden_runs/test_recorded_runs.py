"""Every scenario gives the numbers it gave before issue 23's refactor.

`recorded.json` holds the outputs of `fedq simulate` for each case of `cases.py`, recorded on the
commit before the mode interface landed. Each test runs the same command again, as a user does
(a subprocess of the installed entry point), and compares every number of the summary and of every
round exactly: accuracy, loss, bytes up and down, control bytes, bits, epsilon, which clients
were selected, updated or dropped. Only wall-clock times and the placement report are left out.

A change that moves a number on purpose re-records the case (`python tests/golden_runs/record.py
CASE`) in the same commit and says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import CASES  # noqa: E402
from record import outcome, run  # noqa: E402

RECORDED = json.loads((HERE / "recorded.json").read_text())

# The cases that load a pretrained transformer or start Ray take tens of seconds each.
HEAVY = {"quickstart_ray", "rotten_tomatoes_minilm_lora", "split_smollm2_amaq", "scale_mnist1d"}


def _param(case: str) -> object:
    return pytest.param(case, marks=pytest.mark.slow) if case in HEAVY else case


def test_every_case_was_recorded() -> None:
    assert sorted(RECORDED) == sorted(CASES)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_the_run_gives_the_recorded_numbers(case: str, tmp_path: Path) -> None:
    got = run(case, tmp_path)
    want = RECORDED[case]
    assert got["summary"] == want["summary"]
    assert len(got["rounds"]) == len(want["rounds"])
    for mine, theirs in zip(got["rounds"], want["rounds"], strict=True):
        assert mine == theirs, f"round {theirs.get('round')} differs"


def test_the_outcome_reader_keeps_what_depends_on_the_run(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"final_accuracy": 0.5, "wall_seconds": 3.0}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 0, "seconds": 1.0, "loss": 2.0}))
    assert outcome(tmp_path) == {
        "summary": {"final_accuracy": 0.5},
        "rounds": [{"round": 0, "loss": 2.0}],
    }
