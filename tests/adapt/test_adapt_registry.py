"""``make_policy``: every registered name builds, and bad input fails with the allowed values."""

from __future__ import annotations

import pytest
import torch

from fedq.adapt import (
    POLICIES,
    BitContext,
    BitPolicy,
    BudgetBits,
    ClientEntropyBits,
    CosineBits,
    FixedBits,
    make_policy,
)
from fedq.codec import QuantSpec
from fedq.errors import ConfigError


def test_registry_names() -> None:
    assert set(POLICIES) == {"fixed", "cosine", "client_entropy", "budget"}


@pytest.mark.parametrize(
    ("name", "params", "cls"),
    [
        ("fixed", {"bits": 4}, FixedBits),
        ("cosine", {"b_max": 16, "b_min": 4}, CosineBits),
        ("client_entropy", {"b_min": 12}, ClientEntropyBits),
        ("budget", {"bytes_per_round": 4096, "spec": QuantSpec(symmetric=True)}, BudgetBits),
    ],
)
def test_make_policy_builds_each(name: str, params: dict[str, object], cls: type) -> None:
    policy: BitPolicy = make_policy(name, **params)
    assert isinstance(policy, cls)
    assert policy.name == name
    bits = policy.choose({"w": torch.randn(4, 4)}, BitContext(0, 10))
    assert set(bits) == {"w"} and all(isinstance(b, int) for b in bits.values())
    assert isinstance(policy.state_dict(), dict)


def test_make_policy_passes_params() -> None:
    assert make_policy("fixed", bits=3).choose({"w": torch.zeros(2)}, BitContext(0, 1)) == {"w": 3}
    cosine = make_policy("cosine", b_max=16, b_min=4)
    assert cosine.choose({"w": torch.zeros(2)}, BitContext(0, 10)) == {"w": 16}


def test_unknown_name_lists_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        make_policy("cosin")
    msg = str(info.value)
    assert "'cosin'" in msg
    for name in POLICIES:
        assert name in msg


def test_unknown_and_missing_params_are_listed_together() -> None:
    with pytest.raises(ConfigError) as info:
        make_policy("budget", bytes=100, bmin=2)
    problems = info.value.problems
    assert any("unknown parameter 'bytes'" in p for p in problems)
    assert any("unknown parameter 'bmin'" in p for p in problems)
    assert any("missing parameter 'bytes_per_round'" in p for p in problems)
    assert any("bytes_per_round, b_min, b_max, spec" in p for p in problems)


def test_bad_values_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="b_min"):
        make_policy("cosine", b_min=20, b_max=10)
    with pytest.raises(ConfigError, match=r"1\.\.32"):
        make_policy("fixed", bits=40)
