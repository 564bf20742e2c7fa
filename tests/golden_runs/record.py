"""Record the golden runs on this machine: `python tests/golden_runs/record.py [case ...]` writes
them under this machine's CPU signature in recorded.json (see cases.py and machine.py); the
reference recorded before issue 23's refactor is never rewritten by it."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from cases import CASES, DROP_ROUND, DROP_SUMMARY  # noqa: E402
from machine import cpu_signature  # noqa: E402


def outcome(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "summary": {k: v for k, v in summary.items() if k not in DROP_SUMMARY},
        "rounds": [{k: v for k, v in r.items() if k not in DROP_ROUND} for r in rounds],
    }


def run(case: str, tmp: Path) -> dict:
    scenario, overrides = CASES[case]
    out = tmp / case
    cmd = [
        str(Path(sys.executable).parent / "fedq"),
        "simulate",
        str(ROOT / "scenarios" / scenario),
    ]
    cmd += [a for o in overrides for a in ("--set", o)] + ["--out", str(out), "-q"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return outcome(out)


def main(names: list[str]) -> None:
    path = HERE / "recorded.json"
    recorded = json.loads(path.read_text())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    mine = recorded["machines"].setdefault(cpu_signature(), {"commit": commit, "cases": {}})
    mine["commit"] = commit
    with tempfile.TemporaryDirectory() as tmp:
        for case in names or list(CASES):
            mine["cases"][case] = run(case, Path(tmp))
            print(case, mine["cases"][case]["summary"].get("final_accuracy"), flush=True)
            path.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
