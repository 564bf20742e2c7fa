"""The mode registry and the one model registry: every mode a scenario may name is a registered
:class:`~fedq.modes.Mode` whose configuration rules the config checks; the runtime asks the mode
(its round policy, its models, its checkpointed client states), never the mode's name."""

from __future__ import annotations

import pytest

from fedq.config import MODE_RULES, config_from_dict
from fedq.errors import ConfigError
from fedq.models import model_entry, models_for
from fedq.modes import MODES, FederatedMode, Mode, SplitMode, get_mode, register
from fedq.rounds.workload import RoundPolicy, TakeTurns


def test_the_built_in_modes_are_registered_with_their_rules() -> None:
    assert list(MODES) == ["federated", "split"]
    assert isinstance(MODES["federated"], FederatedMode) and isinstance(MODES["split"], SplitMode)
    for name, mode in MODES.items():
        assert mode.name == name and MODE_RULES[name] is mode.rules
        assert get_mode(name) is mode


def test_an_unknown_mode_is_one_error_listing_the_registered_modes() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"mode": "splitfed", "split": {"cut": 2}})
    assert e.value.problems == [
        "mode: must be one of 'federated' | 'split' (the registered modes), got 'splitfed'"
    ]
    with pytest.raises(ConfigError, match=r"unknown mode 'x'; registered modes: federated, split"):
        get_mode("x")


def test_a_mode_name_registers_once() -> None:
    class Again(FederatedMode):
        pass

    with pytest.raises(ValueError, match="duplicate mode name 'federated'"):
        register(Again())


def test_each_mode_asks_the_engine_for_its_own_policy() -> None:
    fed = config_from_dict({"defence": {"max_bad_updates": 3}})
    assert get_mode("federated").round_policy(fed) == RoundPolicy(max_bad_updates=3)
    split = config_from_dict({"mode": "split", "split": {"local_steps": 5}})
    assert get_mode("split").round_policy(split) == RoundPolicy(turns=TakeTurns(5))


def test_one_model_registry_serves_both_modes() -> None:
    assert get_mode("federated").model_names() == [
        "cnn",
        "minilm_lora",
        "mlp",
        "smollm2_instruct",
        "tiny_bert_lora",
    ]
    assert get_mode("split").model_names() == [  # in the order they were registered
        "smollm2_instruct",
        "minilm_lora",
        "tiny_bert_lora",
        "smollm2_lora",
        "tiny_llama_lora",
    ]
    for e in models_for("split"):
        assert e.family in ("bert", "llama"), e
    # the widths a split boundary is built for before the model exists
    minilm, smol, tiny = (model_entry(n) for n in ("minilm_lora", "smollm2_lora", "tiny_bert_lora"))
    assert minilm is not None and smol is not None and tiny is not None
    assert (minilm.hidden(64), smol.hidden(64), tiny.hidden(64)) == (384, 576, 64)


def test_client_states_are_checkpointed_as_each_mode_keeps_them() -> None:
    fed, split = get_mode("federated"), get_mode("split")
    states = [{"client-0": {"a": 1}}, {"client-1": {"b": 2}}]
    principals = ["worker-0", "worker-1"]
    merged = fed.merge_client_states(states, principals)
    assert merged == {"client-0": {"a": 1}, "client-1": {"b": 2}}
    assert fed.client_state_of(merged, "worker-1") == merged  # portable to any worker
    per_worker = split.merge_client_states(states, principals)
    assert per_worker == {"worker-0": {"client-0": {"a": 1}}, "worker-1": {"client-1": {"b": 2}}}
    assert split.client_state_of(per_worker, "worker-1") == {"client-1": {"b": 2}}
    assert split.client_state_of(per_worker, "worker-9") == {}


def test_mode_is_the_interface_the_registry_holds() -> None:
    assert all(isinstance(m, Mode) for m in MODES.values())
