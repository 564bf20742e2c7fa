"""Every scenario gives the numbers it gave before issue 23's refactor.

`recorded.json` holds the outputs of `fedq simulate` for each case of `cases.py`. Its
``reference`` was recorded on the commit before the mode interface landed (on an Intel Xeon);
``machines`` holds exact recordings keyed by CPU and torch build (:func:`machine.cpu_signature`).
Each test runs the same command again, as a user does (a subprocess of the installed entry point),
and compares every number of the summary and of every round:

- with the reference, always: every count, byte total, bit width, selected / updated / dropped
  client, epsilon and accuracy exactly, and every float within a relative :data:`TOLERANCE`
  (another CPU rounds floats differently in the last bits: on an AMD EPYC the losses differ by
  < 2e-7 relative, and by up to 5e-4 (perplexity 2.2e-3) in the two AMAQ split runs, where a
  6-layer transformer with quantized activations amplifies the rounding);
- with this machine's own recording, when it has one: everything exactly.

Only wall-clock times, the placement report and control-plane bytes are left out (cases.py).
A change that moves a number on purpose re-records the case (`python tests/golden_runs/record.py
CASE`) in the same commit and says why.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import CASES  # noqa: E402
from machine import cpu_signature  # noqa: E402
from record import outcome, run  # noqa: E402

RECORDED = json.loads((HERE / "recorded.json").read_text())
REFERENCE = RECORDED["reference"]["cases"]
MINE = RECORDED["machines"].get(cpu_signature(), {}).get("cases")
#: Relative tolerance of a float against the reference recorded on another CPU.
TOLERANCE = 1e-5
AMPLIFIED = {"split_minilm_amaq": 1e-2, "split_smollm2_amaq": 1e-2}

# The cases that load a pretrained transformer or start Ray take tens of seconds each.
HEAVY = {"quickstart_ray", "rotten_tomatoes_minilm_lora", "split_smollm2_amaq", "scale_mnist1d"}


def _param(case: str) -> object:
    return pytest.param(case, marks=pytest.mark.slow) if case in HEAVY else case


def test_every_case_was_recorded() -> None:
    assert sorted(REFERENCE) == sorted(CASES)
    for machine in RECORDED["machines"].values():
        assert sorted(machine["cases"]) == sorted(CASES)


def close_to(got: object, want: object, tol: float, where: str) -> list[str]:
    """Where ``got`` differs from ``want``: floats beyond relative ``tol``, anything else at
    all (keys, counts, booleans, strings, ids)."""
    if isinstance(got, dict) and isinstance(want, dict):
        if set(got) != set(want):
            return [f"{where}: keys {sorted(set(got) ^ set(want))}"]
        return [p for k in want for p in close_to(got[k], want[k], tol, f"{where}.{k}")]
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items != {len(want)}"]
        return [
            p
            for i, (g, w) in enumerate(zip(got, want, strict=True))
            for p in close_to(g, w, tol, f"{where}[{i}]")
        ]
    if isinstance(want, float) and isinstance(got, float) and not want.is_integer():
        # a whole-number float (a bit width, a byte count) is compared exactly
        ok = math.isclose(got, want, rel_tol=tol, abs_tol=1e-12)
        return [] if ok else [f"{where}: {got!r} != {want!r} (rel tol {tol:g})"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_the_run_gives_the_recorded_numbers(case: str, tmp_path: Path) -> None:
    got = run(case, tmp_path)
    problems = close_to(got, REFERENCE[case], AMPLIFIED.get(case, TOLERANCE), case)
    assert not problems, "\n".join(problems[:10])
    if MINE is None:
        return  # no exact recording for this CPU: the reference within tolerance is the check
    want = MINE[case]
    assert got["summary"] == want["summary"]
    assert len(got["rounds"]) == len(want["rounds"])
    for mine, theirs in zip(got["rounds"], want["rounds"], strict=True):
        assert mine == theirs, f"round {theirs.get('round')} differs"


def test_the_comparison_tells_rounding_from_a_change() -> None:
    want = {"loss": 2.5, "bits": 4.0, "bytes_up": 100, "clients": ["a", "b"]}
    assert close_to({**want, "loss": 2.5 + 1e-6}, want, 1e-5, "r") == []
    assert close_to({**want, "loss": 2.501}, want, 1e-5, "r") == [
        "r.loss: 2.501 != 2.5 (rel tol 1e-05)"
    ]
    assert close_to({**want, "bits": 4.0 + 1e-9}, want, 1e-5, "r") != []  # whole: exact
    assert close_to({**want, "bytes_up": 101}, want, 1e-5, "r") == ["r.bytes_up: 101 != 100"]
    assert close_to({**want, "clients": ["a"]}, want, 1e-5, "r") == ["r.clients: 1 items != 2"]


def test_the_outcome_reader_keeps_what_depends_on_the_run(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"final_accuracy": 0.5, "wall_seconds": 3.0}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 0, "seconds": 1.0, "loss": 2.0}))
    assert outcome(tmp_path) == {
        "summary": {"final_accuracy": 0.5},
        "rounds": [{"round": 0, "loss": 2.0}],
    }
