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
    assert cfg.rounds.clients_per_round <= cfg.rounds.num_clients


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_are_valid(path: Path) -> None:
    from fedq.runtime.sweep import load_sweep

    sweep = load_sweep(path)
    assert len(sweep.runs) >= 2
    assert len({r.label for r in sweep.runs}) == len(sweep.runs)


def test_defaults_and_int_widens_to_float() -> None:
    cfg = config_from_dict({"train": {"lr": 1}, "rounds": {"count": 3}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.rounds.count == 3
    assert cfg.compression.downlink.policy == "none"


def test_every_problem_reported_at_once_naming_keys() -> None:
    raw = {
        "rounds": {"count": "x", "num_clients": 10, "clients_per_round": 20},
        "fed": {"roundz": 3},
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
        "rounds.count: expected int",
        "rounds.clients_per_round: 20 exceeds",
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
    f.write_text("rounds:\n  count: 2\n")
    cfg = load_scenario(f, ["rounds.count=5", "compression.uplink.bits=3", "data.max_train=null"])
    assert cfg.rounds.count == 5 and cfg.compression.uplink.bits == 3
    with pytest.raises(ConfigError, match=r"rounds\.count: expected int"):
        load_scenario(f, ["rounds.count=abc"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_scenario(f, ["rounds.count"])


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


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"mode": "split", "compression": {"uplink": {"bits": 2}}}, "compression"),
        ({"mode": "split", "train": {"local_epochs": 2}}, "train.local_epochs"),
        ({"mode": "split", "fed": {"proximal_mu": 0.1}}, "fed.proximal_mu"),
        ({"mode": "split", "fed": {"tau": 0.1}}, "fed.tau"),
        ({"mode": "split", "fed": {"strategy": "fedadam"}}, "fed.strategy"),
        ({"split": {"cut": 2}}, "split"),
    ],
)
def test_a_key_the_mode_ignores_is_an_error_naming_it(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(f"{key}: ")
    assert "mode" in e.value.problems[0]


def test_split_mode_honours_fedavg_and_the_train_section() -> None:
    cfg = config_from_dict(
        {
            "mode": "split",
            "fed": {"strategy": "fedavg"},
            "train": {"optimizer": "sgd", "momentum": 0.5, "lr": 0.2},
        }
    )
    assert (cfg.train.optimizer, cfg.train.momentum, cfg.train.weight_decay) == ("sgd", 0.5, 0.01)


def test_optimizer_defaults_depend_on_the_mode_and_are_saved_resolved() -> None:
    fed, split = config_from_dict({}), config_from_dict({"mode": "split"})
    assert (fed.train.optimizer, fed.train.weight_decay) == ("sgd", 0.0)
    assert (split.train.optimizer, split.train.weight_decay) == ("adamw", 0.01)
    chosen = config_from_dict({"mode": "split", "train": {"optimizer": "adam", "weight_decay": 0}})
    assert (chosen.train.optimizer, chosen.train.weight_decay) == ("adam", 0.0)
    # config.json holds only what the mode uses, resolved, and loads back unchanged
    assert "split" not in fed.to_dict() and "compression" in fed.to_dict()
    d = split.to_dict()
    assert "compression" not in d and "local_epochs" not in d["train"]
    assert d["train"]["optimizer"] == "adamw" and "proximal_mu" not in d["fed"]
    assert config_from_dict(d) == split and config_from_dict(fed.to_dict()) == fed


def test_saved_config_json_loads_back_with_its_numbers(tmp_path: Path) -> None:
    """A run's config.json reloads (``--resume``): JSON is read as JSON, so ``1e-05`` (which the
    YAML loader would read as a string) stays the float it was."""
    import json

    cfg = config_from_dict({"privacy": {"mechanism": "dpsgd", "target_epsilon": 2.0}})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict(), indent=2))
    assert '"delta": 1e-05' in path.read_text()
    again = load_scenario(path, ["rounds.count=18"])
    assert again.privacy.delta == 1e-05 and again.rounds.count == 18
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_scenario(path)


def test_split_section_keeps_only_options_a_user_chooses() -> None:
    """The split section's keys (ablation knobs that lost are gone: each is an unknown key)."""
    from fedq.config import SplitConfig

    assert len(SplitConfig.__dataclass_fields__) == 17  # budget_bytes: BENCHMARKS "byte budget"
    for gone in (
        "reg_mode",
        "gate_momentum",
        "alpha",
        "per_token",
        "grad_stochastic",
        "row_scale",
        "gate_freeze_fraction",
        "act_scale_dtype",
    ):
        with pytest.raises(ConfigError, match=f"split.{gone}: unknown key"):
            config_from_dict({"mode": "split", "split": {gone: 1}})


def test_registry_names_and_data_problems_are_found_before_any_host_starts(
    tmp_path: Path,
) -> None:
    from fedq.runtime.preflight import name_problems
    from fedq.runtime.simulate import simulate

    bad = config_from_dict({"model": {"name": "mpl"}, "data": {"name": "digitz"}})
    assert [p.split(":")[0] for p in name_problems(bad)] == ["data.name", "model.name"]
    split = config_from_dict({"mode": "split", "model": {"name": "mlp"}})
    assert "for mode 'split'" in name_problems(split)[0]
    sized = config_from_dict({"data": {"name": "digits", "num_samples": 5000}})
    problems = name_problems(sized)
    assert len(problems) == 1
    assert problems[0].startswith("data.num_samples: data set 'digits' has a fixed size")
    assert name_problems(config_from_dict({"data": {"name": "mnist1d", "num_samples": 5000}})) == []
    with pytest.raises(ConfigError, match=r"data\.num_samples: must be >= 1"):
        config_from_dict({"data": {"name": "mnist1d", "num_samples": 0}})
    too_many = config_from_dict(
        {
            "rounds": {"num_clients": 1000, "clients_per_round": 5},
            "runtime": {"backend": "inprocess"},
        }
    )
    with pytest.raises(ConfigError, match=r"dirichlet partition: .*rounds\.num_clients=1000"):
        simulate(too_many, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_chunk_size_limit_matches_the_transport() -> None:
    """A chunk size the config accepts is one the transport sends (checked at load, not after
    the hosts start)."""
    from fedq.config import MAX_CHUNK_BYTES
    from fedq.transport.server import MAX_CHUNK_SIZE

    assert MAX_CHUNK_BYTES == MAX_CHUNK_SIZE
    config_from_dict({"runtime": {"chunk_bytes": MAX_CHUNK_BYTES}})
    with pytest.raises(ConfigError, match=r"runtime\.chunk_bytes"):
        config_from_dict({"runtime": {"chunk_bytes": MAX_CHUNK_BYTES + 1}})


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"data": {"site_holdout": 0.6}}, "data.site_holdout: must be in [0, 0.5], got 0.6"),
        (
            {
                "data": {"site_holdout": 0.1},
                "privacy": {"mechanism": "laplace", "target_epsilon": 5},
            },
            "data.site_holdout: the sites' own evaluation figures are sent without noise",
        ),
    ],
)
def test_site_holdout_is_a_share_of_rows_and_stays_out_of_private_runs(
    raw: dict, problem: str
) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(problem)
    assert config_from_dict({"data": {"site_holdout": 0.1}}).data.site_holdout == 0.1
