"""The ``rounds:`` section from the command line: a schedule key given under its old name in
``fed`` stops the run with one line naming its new key, and a run folder saved before the move
resumes. (rename-rounds: skip: this file keeps the old keys on purpose.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

Run = Callable[..., Any]

SMALL = ["--set", "runtime.backend=inprocess", "--set", "data.max_train=200", "-q"]


@pytest.mark.parametrize(
    ("override", "new"),
    [("fed.rounds=2", "rounds.count"), ("fed.round_timeout_s=5", "rounds.timeout_s")],
)
def test_an_old_key_in_set_is_one_line_naming_the_new_key(
    fedq_cli: Run, tmp_path: Path, override: str, new: str
) -> None:
    out = tmp_path / "never"
    done = fedq_cli(
        "simulate", "scenarios/quickstart.yaml", "--set", override, "--out", str(out), "-q"
    )
    old = override.partition("=")[0]
    assert done.returncode == 2
    assert done.stderr == f"fedq: error: invalid configuration: {old}: moved to {new}\n"
    assert not out.exists()


def test_an_old_key_in_a_scenario_file_is_one_line_naming_the_new_key(
    fedq_cli: Run, tmp_path: Path
) -> None:
    scenario = tmp_path / "old.yaml"
    scenario.write_text("fed:\n  strategy: fedavg\n  clients_per_round: 2\n")
    done = fedq_cli("simulate", str(scenario), "--out", str(tmp_path / "never"), "-q")
    assert done.returncode == 2
    assert done.stderr == (
        "fedq: error: invalid configuration: fed.clients_per_round: moved to "
        "rounds.clients_per_round\n"
    )


def test_a_run_folder_saved_with_the_old_keys_resumes(fedq_cli: Run, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = fedq_cli(
        "simulate",
        str(ROOT / "scenarios" / "quickstart.yaml"),
        "--set",
        "rounds.count=1",
        "--out",
        str(out),
        *SMALL,
    )
    assert first.returncode == 0, first.stderr
    saved = json.loads((out / "config.json").read_text())
    # the layout fedq wrote before the rounds section: the schedule inside fed
    rounds = saved.pop("rounds")
    saved["fed"].update(
        rounds=rounds["count"],
        num_clients=rounds["num_clients"],
        clients_per_round=rounds["clients_per_round"],
        min_clients=rounds["min_clients"],
        eval_every=rounds["eval_every"],
        round_timeout_s=rounds["timeout_s"],
    )
    (out / "config.json").write_text(json.dumps(saved, indent=2))

    again = fedq_cli("simulate", "--resume", str(out), "--set", "rounds.count=2", *SMALL)
    assert again.returncode == 0, again.stderr
    assert "resuming at round 1" in again.stdout
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1]
    now = json.loads((out / "config.json").read_text())
    assert now["rounds"] == {**rounds, "count": 2}
    assert not {"rounds", "num_clients", "round_timeout_s"} & set(now["fed"])
