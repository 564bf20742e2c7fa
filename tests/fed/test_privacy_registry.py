"""Federated privacy mechanisms are classes behind a registry (fedq.fed.privacy.MECHANISMS): the
config's names are the registry's, each name builds its class, and every mechanism writes and
reads the checkpoint layout of the single class they replaced (the literal states below were
written by it: old checkpoints load, new ones are the same)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from fedq.config import FED_PRIVACY, SPLIT_PRIVACY, RunConfig, config_from_dict
from fedq.errors import ConfigError
from fedq.fed.privacy import (
    MECHANISMS,
    CentralPrivacy,
    DpsgdPrivacy,
    LaplacePrivacy,
    ServerPrivacy,
    make_privacy,
    mechanism_class,
    register_mechanism,
)
from fedq.rounds.workload import NoPrivacy
from fedq.split.privacy import LEDGERS, ActivationLedger, make_ledger

SIZES = {0: 40, 1: 64, 2: 100, 3: 33}
PRIVACY = {
    "none": {"mechanism": "none"},
    "dpsgd": {"mechanism": "dpsgd", "target_epsilon": 8.0},
    "central": {"mechanism": "central", "noise_multiplier": 1.5, "target_epsilon": 20.0},
    "laplace": {"mechanism": "laplace", "target_epsilon": 6.0, "clip_norm": 2.0},
}
#: state_dict() after charging [0, 3] then [1, 3], as the one-class ServerPrivacy wrote it
OLD_STATES: dict[str, dict[str, Any]] = {
    "none": {},
    "dpsgd": {
        "central": None,
        "clients": {
            0: {"delta": 1e-05, "history": [[0.908203125, 1 / 3, 3]], "kind": "rdp"},
            1: {"delta": 1e-05, "history": [[0.908203125, 0.25, 4]], "kind": "rdp"},
            3: {"delta": 1e-05, "history": [[0.908203125, 1 / 3, 6]], "kind": "rdp"},
        },
        "ledger": {"spent": []},
        "noise_multiplier": 0.908203125,
    },
    "central": {
        "central": {"delta": 1e-05, "history": [[1.5, 0.5, 2]], "kind": "rdp"},
        "clients": {},
        "ledger": {"spent": []},
        "noise_multiplier": 1.5,
    },
    "laplace": {
        "central": None,
        "clients": {},
        "ledger": {"spent": [[0, 3.0], [3, 6.0], [1, 3.0]]},
        "noise_multiplier": 0.0,
    },
}
EPSILON = {"none": None, "dpsgd": 7.990075853636205, "central": 3.052246274873121, "laplace": 6.0}


def _cfg(mechanism: str) -> RunConfig:
    return config_from_dict(
        {
            "seed": 1,
            "train": {"local_epochs": 1, "batch_size": 16},
            "rounds": {"count": 4, "num_clients": 4, "clients_per_round": 2},
            "privacy": PRIVACY[mechanism],
        }
    )


def test_the_config_names_are_the_registries() -> None:
    assert tuple(MECHANISMS) == FED_PRIVACY
    assert tuple(LEDGERS) == SPLIT_PRIVACY
    expected = {
        "none": ServerPrivacy,
        "dpsgd": DpsgdPrivacy,
        "central": CentralPrivacy,
        "laplace": LaplacePrivacy,
    }
    for name, cls in expected.items():
        assert type(make_privacy(_cfg(name))) is cls and cls.name == name
        assert mechanism_class(name) is cls
    assert mechanism_class("unknown") is ServerPrivacy  # a client treats it as no mechanism


def test_a_mechanism_of_the_other_mode_is_refused_with_the_registry_names() -> None:
    raw = {"mode": "split", "privacy": {"mechanism": "laplace", "target_epsilon": 1.0}}
    with pytest.raises(ConfigError, match="use one of none, activations"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="use one of none, dpsgd, central, laplace"):
        config_from_dict({"privacy": {"mechanism": "activations", "noise_multiplier": 1.0}})
    fed = _cfg("none")  # a config that skipped its checks still gets the registry's names
    odd = replace(fed, privacy=replace(fed.privacy, mechanism="activations", noise_multiplier=1.0))
    with pytest.raises(ConfigError, match="use one of none, dpsgd, central, laplace"):
        make_privacy(odd)


def test_a_name_registers_once() -> None:
    class Again(ServerPrivacy):
        name = "laplace"

    with pytest.raises(ValueError, match="already registered"):
        register_mechanism(Again)
    assert MECHANISMS["laplace"] is LaplacePrivacy


@pytest.mark.parametrize("mechanism", list(PRIVACY))
def test_checkpoint_layout_is_the_one_class_layout(mechanism: str) -> None:
    ledger = make_privacy(_cfg(mechanism))
    for selected in ([0, 3], [1, 3]):
        ledger.check_round(SIZES, 2)
        assert ledger.eligible(sorted(SIZES), SIZES) == [0, 1, 2, 3]
        ledger.charge(selected, SIZES)
    assert ledger.state_dict() == OLD_STATES[mechanism]
    assert ledger.epsilon() == EPSILON[mechanism]
    # an old checkpoint loads into a fresh ledger, which then continues exactly as the run did
    resumed = make_privacy(_cfg(mechanism))
    resumed.load_state_dict(OLD_STATES[mechanism])
    assert resumed.state_dict() == ledger.state_dict()
    assert resumed.epsilon() == EPSILON[mechanism]
    assert resumed.client_scalars() == ledger.client_scalars()


def test_split_builds_its_ledger_from_its_registry() -> None:
    assert isinstance(make_ledger(config_from_dict({"mode": "split"})), NoPrivacy)
    raw = {"mode": "split", "privacy": {"mechanism": "activations", "noise_multiplier": 1.0}}
    assert isinstance(make_ledger(config_from_dict(raw)), ActivationLedger)
