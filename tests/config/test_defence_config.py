"""The ``defence`` section: typed keys with their defaults, values checked at load, the
combinations with central DP and Krum's minimum number of clients, and split mode refusing it."""

from __future__ import annotations

from typing import Any

import pytest

from fedq.config import DefenceConfig, config_from_dict
from fedq.errors import ConfigError


def _problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    return e.value.problems


def test_defaults_and_saved_config() -> None:
    cfg = config_from_dict({})
    assert cfg.defence == DefenceConfig()
    d = cfg.to_dict()["defence"]
    assert d["aggregator"] == "mean" and d["weights"] == "examples"
    assert d["max_abs_ratio"] == 1e6 and d["max_bad_updates"] == 3
    assert d["clip_norm"] is None and d["max_update_norm"] is None
    assert config_from_dict(cfg.to_dict()) == cfg  # config.json loads back


def test_bad_values_are_all_reported() -> None:
    p = _problems(
        {
            "defence": {
                "aggregator": "mode",
                "trim_fraction": 0.5,
                "krum_m": 0,
                "clip_norm": -1,
                "max_abs_ratio": 0,
                "max_bad_updates": -1,
                "max_examples_per_client": 0,
                "surprise": 1,
            }
        }
    )
    text = "\n".join(p)
    for key in (
        "defence.aggregator",
        "defence.trim_fraction",
        "defence.krum_m",
        "defence.clip_norm",
        "defence.max_abs_ratio",
        "defence.max_bad_updates",
        "defence.max_examples_per_client",
        "defence.surprise: unknown key",
    ):
        assert key in text, key


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "krum"])
def test_central_dp_takes_the_mean_only(aggregator: str) -> None:
    raw = {
        "privacy": {"mechanism": "central", "noise_multiplier": 1.0},
        "defence": {"aggregator": aggregator},
    }
    assert any("does not compose with privacy.mechanism 'central'" in x for x in _problems(raw))
    local = {
        "privacy": {"mechanism": "laplace", "target_epsilon": 5.0},
        "defence": {"aggregator": aggregator, "krum_f": 1},
    }
    assert config_from_dict(local).defence.aggregator == aggregator
    central_mean = {
        "privacy": {"mechanism": "central", "noise_multiplier": 1.0},
        "defence": {"clip_norm": 0.5},
    }
    assert config_from_dict(central_mean).defence.clip_norm == 0.5


def test_krum_needs_enough_clients() -> None:
    raw = {
        "rounds": {"num_clients": 8, "clients_per_round": 8},
        "defence": {"aggregator": "krum", "krum_f": 3, "krum_m": 6},
    }
    p = _problems(raw)
    assert any("needs rounds.clients_per_round >= 2f + 3 = 9, got 8" in x for x in p)
    assert any("defence.krum_m: at most clients_per_round - krum_f = 5" in x for x in p)


def test_split_mode_refuses_the_section() -> None:
    p = _problems(
        {
            "mode": "split",
            "data": {"name": "rotten_tomatoes"},
            "model": {"name": "tiny_bert_lora"},
            "defence": {"aggregator": "median"},
        }
    )
    assert any(x.startswith("defence: not used in mode 'split'") for x in p)
