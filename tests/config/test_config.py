from pathlib import Path

import pytest

from fedq.config import RunConfig, config_from_dict, load_scenario
from fedq.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


SHIPPED = sorted((ROOT / "scenarios").glob("*.yaml"))
SWEEPS = [p for p in SHIPPED if "grid:" in p.read_text()]


@pytest.mark.parametrize("path", [p for p in SHIPPED if p not in SWEEPS], ids=lambda p: p.name)
def test_shipped_scenarios_are_valid(path: Path) -> None:
    cfg = load_scenario(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.fed.clients_per_round <= cfg.fed.num_clients


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_are_valid(path: Path) -> None:
    from fedq.runtime.sweep import load_sweep

    sweep = load_sweep(path)
    assert len(sweep.runs) >= 2
    assert len({r.label for r in sweep.runs}) == len(sweep.runs)


def test_defaults_and_int_widens_to_float() -> None:
    cfg = config_from_dict({"train": {"lr": 1}, "fed": {"rounds": 3}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.fed.rounds == 3
    assert cfg.compression.downlink.policy == "none"


def test_every_problem_reported_at_once_naming_keys() -> None:
    raw = {
        "fed": {"roundz": 3, "rounds": "x", "clients_per_round": 20, "num_clients": 10},
        "compression": {"uplink": {"bits": 0, "policy": "zzz"}},
        "train": {"lr": -1.0, "batch_size": True},
        "bogus": 1,
    }
    with pytest.raises(ConfigError) as ei:
        config_from_dict(raw)
    problems = ei.value.problems
    joined = "\n".join(problems)
    for key in (
        "fed.roundz: unknown key",
        "fed.rounds: expected int",
        "fed.clients_per_round: 20 exceeds",
        "compression.uplink.bits",
        "compression.uplink.policy: must be one of",
        "train.lr: must be > 0",
        "train.batch_size: expected int",
        "bogus: unknown key",
    ):
        assert key in joined, key
    assert len(problems) == 8


def test_section_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="fed: expected a mapping"):
        config_from_dict({"fed": [1, 2]})


def test_budget_policy_needs_budget() -> None:
    with pytest.raises(ConfigError, match="budget_bytes"):
        config_from_dict({"compression": {"uplink": {"policy": "budget"}}})


def test_overrides_are_validated(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("fed:\n  rounds: 2\n")
    cfg = load_scenario(f, ["fed.rounds=5", "compression.uplink.bits=3", "data.max_train=null"])
    assert cfg.fed.rounds == 5 and cfg.compression.uplink.bits == 3
    with pytest.raises(ConfigError, match=r"fed\.rounds: expected int"):
        load_scenario(f, ["fed.rounds=abc"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_scenario(f, ["fed.rounds"])


def test_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fed: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_scenario(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_scenario(lst)
