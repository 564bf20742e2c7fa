"""The ``rounds:`` section: the schedule both modes share. A key that moved there from ``fed:`` is a
one-line error naming its new key (in the scenario and in ``--set``); a run folder saved before the
move resumes with its keys moved. (rename-rounds: skip: this file keeps the old keys on purpose.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedq.config import (
    MOVED_FROM_FED,
    RoundsConfig,
    RunConfig,
    config_from_dict,
    load_scenario,
    migrate_saved,
)
from fedq.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

NEW_KEYS = {
    "rounds": "rounds.count",
    "num_clients": "rounds.num_clients",
    "clients_per_round": "rounds.clients_per_round",
    "min_clients": "rounds.min_clients",
    "eval_every": "rounds.eval_every",
    "round_timeout_s": "rounds.timeout_s",
}


def _problems(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    return e.value.problems


def test_the_schedule_is_its_own_section_and_fed_holds_the_optimizer() -> None:
    assert {f"rounds.{v}" for v in MOVED_FROM_FED.values()} == set(NEW_KEYS.values())
    cfg = config_from_dict(
        {
            "rounds": {
                "count": 7,
                "num_clients": 6,
                "clients_per_round": 3,
                "min_clients": 2,
                "eval_every": 2,
                "timeout_s": 9,
            },
            "fed": {"strategy": "fedprox", "proximal_mu": 0.2},
        }
    )
    assert cfg.rounds == RoundsConfig(
        count=7, num_clients=6, clients_per_round=3, min_clients=2, eval_every=2, timeout_s=9.0
    )
    assert cfg.fed.strategy == "fedprox" and cfg.fed.proximal_mu == 0.2
    saved = cfg.to_dict()
    assert saved["rounds"]["count"] == 7 and not set(saved["fed"]) & set(MOVED_FROM_FED)
    assert config_from_dict(saved) == cfg


@pytest.mark.parametrize(("old", "new"), sorted(NEW_KEYS.items()))
def test_each_moved_key_is_one_line_naming_its_new_key(old: str, new: str) -> None:
    assert _problems({"fed": {old: 3}}) == [f"fed.{old}: moved to {new}"]


def test_moved_keys_are_reported_with_every_other_problem() -> None:
    problems = _problems(
        {
            "fed": {"rounds": 3, "strategy": "fedavg", "round_timeout_s": 5, "roundz": 1},
            "rounds": {"clients_per_round": 11},
        }
    )
    assert problems[:2] == [
        "fed.rounds: moved to rounds.count",
        "fed.round_timeout_s: moved to rounds.timeout_s",
    ]
    assert any(
        p.startswith("fed.roundz: unknown key (allowed in fed: strategy, ") for p in problems
    )
    assert problems[3:] == ["rounds.clients_per_round: 11 exceeds rounds.num_clients=10"]


def test_an_old_key_in_a_set_override_names_the_new_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["fed.rounds=3"])
    assert e.value.problems == ["fed.rounds: moved to rounds.count"]
    assert str(e.value).count("\n") == 0  # one line


def test_an_old_key_in_a_yaml_scenario_names_the_new_key(tmp_path: Path) -> None:
    f = tmp_path / "old.yaml"
    f.write_text("fed: {strategy: fedavg, num_clients: 4, clients_per_round: 2, rounds: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_scenario(f)
    assert e.value.problems == [
        "fed.num_clients: moved to rounds.num_clients",
        "fed.clients_per_round: moved to rounds.clients_per_round",
        "fed.rounds: moved to rounds.count",
    ]


def test_split_mode_takes_the_rounds_section_and_still_refuses_fedprox_keys() -> None:
    cfg = config_from_dict({"mode": "split", "rounds": {"count": 2, "min_clients": 1}})
    assert cfg.rounds.count == 2 and "proximal_mu" not in cfg.to_dict()["fed"]
    problems = _problems({"mode": "split", "fed": {"proximal_mu": 0.1, "strategy": "fedadam"}})
    assert any(p.startswith("fed.proximal_mu: not used in mode 'split'") for p in problems)
    assert any(p.startswith("fed.strategy: mode 'split' averages") for p in problems)


def _old_layout(saved: dict[str, Any]) -> dict[str, Any]:
    """A config.json as fedq wrote it before the rounds section."""
    old = {k: v for k, v in saved.items() if k != "rounds"}
    back = {v: k for k, v in MOVED_FROM_FED.items()}
    old["fed"] = {**saved["fed"], **{back[k]: v for k, v in saved["rounds"].items()}}
    return old


def test_migrate_saved_moves_the_schedule_and_leaves_a_clash_to_the_error() -> None:
    cfg = config_from_dict(
        {"rounds": {"count": 5, "timeout_s": 30}, "fed": {"strategy": "fedadam"}}
    )
    old = _old_layout(cfg.to_dict())
    assert old["fed"]["rounds"] == 5 and old["fed"]["round_timeout_s"] == 30.0
    assert config_from_dict(migrate_saved(old)) == cfg
    clash = {"fed": {"rounds": 5}, "rounds": {"count": 4}}
    assert migrate_saved(clash) == clash
    assert _problems(clash) == ["fed.rounds: moved to rounds.count"]


def _small() -> RunConfig:
    return config_from_dict(
        {
            "seed": 2,
            "data": {"name": "digits", "max_train": 200},
            "model": {"name": "mlp", "hidden": 8},
            "rounds": {"count": 3, "num_clients": 3, "clients_per_round": 2},
            "compression": {"uplink": {"policy": "fixed", "bits": 4, "error_feedback": True}},
            "runtime": {"backend": "inprocess", "workers": 1},
        }
    )


def test_a_run_folder_saved_before_the_move_resumes_to_the_same_result(tmp_path: Path) -> None:
    from fedq.runtime.simulate import simulate

    full = simulate(_small(), tmp_path / "full")

    def stop_after_round_0(rec: dict[str, Any]) -> None:
        if rec["round"] == 0:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    assert simulate(_small(), part, on_round=stop_after_round_0)["interrupted"] is True
    saved = part / "config.json"
    saved.write_text(json.dumps(_old_layout(json.loads(saved.read_text())), indent=2))
    assert "rounds" not in json.loads(saved.read_text())

    again = load_scenario(saved)  # what --resume DIR reads
    assert again == _small()
    resumed = simulate(again, part, resume=True)
    assert resumed["final_accuracy"] == full["final_accuracy"]
    assert resumed["bytes_wire_total"] == full["bytes_wire_total"]
    assert json.loads(saved.read_text())["rounds"]["count"] == 3  # written back in the new layout
    # an old key given with --resume is still the error, not moved
    with pytest.raises(
        ConfigError, match=r"^invalid configuration: fed\.rounds: moved to rounds\.count$"
    ):
        load_scenario(saved, ["fed.rounds=4"])
