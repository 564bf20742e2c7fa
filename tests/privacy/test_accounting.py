"""Accountants equal Opacus; what-if queries do not mutate; state round-trips, budget stop."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedq.errors import ConfigError, PrivacyBudgetExceeded
from fedq.privacy import (
    BudgetGuard,
    GaussianAccountant,
    PrivacyStateError,
    PureEpsilonLedger,
    expected_epsilon,
    plan_noise_multiplier,
)

DELTA = 1e-5
RUNS = [(1.1, 0.01, 300), (0.8, 0.02, 50)]  # two different (z, q, steps) runs


def _opacus_epsilon(kind: str, runs: list[tuple[float, float, int]]) -> float:
    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for z, q, n in runs:
        for _ in range(n):
            acc.step(noise_multiplier=z, sample_rate=q)
    return float(acc.get_epsilon(delta=DELTA))


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant(kind: str) -> None:
    acc = GaussianAccountant(kind, DELTA)  # type: ignore[arg-type]
    assert acc.epsilon() == 0.0
    for z, q, n in RUNS:
        acc.step(z, q, n // 2)
        acc.step(z, q, n - n // 2)  # merged into one run, as Opacus merges single steps
    assert acc.history == [(float(z), float(q), n) for z, q, n in RUNS]
    assert acc.steps == sum(n for *_, n in RUNS)
    eps = acc.epsilon()
    assert eps == pytest.approx(_opacus_epsilon(kind, RUNS), rel=1e-12)
    assert 0.5 < eps < 20


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_if_does_not_mutate_and_predicts_the_step(kind: str) -> None:
    acc = GaussianAccountant(kind, DELTA)  # type: ignore[arg-type]
    acc.step(1.0, 0.05, 100)
    before, hist = acc.epsilon(), acc.history
    projected = acc.epsilon_if(1.0, 0.05, 50)
    assert acc.history == hist and acc.epsilon() == before
    assert projected > before
    acc.step(1.0, 0.05, 50)
    assert acc.epsilon() == pytest.approx(projected, rel=1e-12)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_state_dict_round_trips_through_json_and_continues_identically(kind: str) -> None:
    a = GaussianAccountant(kind, DELTA)  # type: ignore[arg-type]
    for z, q, n in RUNS:
        a.step(z, q, n)
    state = json.loads(json.dumps(a.state_dict()))
    b = GaussianAccountant(kind, 0.5)  # type: ignore[arg-type]  # delta comes from the state
    b.load_state_dict(state)
    assert b.delta == DELTA and b.history == a.history
    assert b.epsilon() == a.epsilon()
    a.step(0.8, 0.02, 10)  # same (z, q) as the last run: merges in both
    b.step(0.8, 0.02, 10)
    a.step(2.0, 0.1, 5)
    b.step(2.0, 0.1, 5)
    assert b.history == a.history and b.epsilon() == a.epsilon()


def test_state_of_another_kind_or_malformed_is_refused() -> None:
    rdp = GaussianAccountant("rdp", DELTA)
    rdp.step(1.0, 0.1, 3)
    with pytest.raises(PrivacyStateError, match="'rdp'"):
        GaussianAccountant("prv", DELTA).load_state_dict(rdp.state_dict())
    with pytest.raises(PrivacyStateError, match="entry 0"):
        rdp.load_state_dict({"kind": "rdp", "delta": DELTA, "history": [[1.0, 2.0, 3]]})
    assert rdp.steps == 3  # a refused load changes nothing


def test_invalid_accountant_arguments() -> None:
    with pytest.raises(ConfigError, match="allowed: rdp, prv"):
        GaussianAccountant("moments", DELTA)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="delta"):
        GaussianAccountant("rdp", 0.0)
    with pytest.raises(ConfigError, match="sample_rate"):
        GaussianAccountant("rdp", DELTA).step(1.0, 1.5)


@pytest.mark.parametrize(("kind", "steps"), [("rdp", 1000), ("prv", 200)])
def test_planned_noise_reaches_target_epsilon(kind: str, steps: int) -> None:
    target, q = 3.0, 0.01
    z = plan_noise_multiplier(target, DELTA, q, steps, kind)  # type: ignore[arg-type]
    eps = expected_epsilon(z, q, steps, DELTA, kind)  # type: ignore[arg-type]
    assert target - 0.01 <= eps <= target  # Opacus's binary-search tolerance
    assert expected_epsilon(z * 0.9, q, steps, DELTA, kind) > target  # type: ignore[arg-type]


def test_unreachable_target_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unreachable"):
        plan_noise_multiplier(1e-9, DELTA, 1.0, 10**6)


def test_ledger_composes_sequentially_per_client_and_round_trips() -> None:
    led = PureEpsilonLedger()
    assert led.max_spent() == 0.0
    led.charge(1, 0.5)
    led.charge(1, 0.25)
    led.charge("site-b", 2.0)
    assert led.spent(1) == pytest.approx(0.75)
    assert led.spent(7) == 0.0
    assert led.max_spent() == pytest.approx(2.0)
    assert led.epsilon_if(1, 0.5) == pytest.approx(1.25) and led.spent(1) == pytest.approx(0.75)
    other = PureEpsilonLedger()
    other.load_state_dict(json.loads(json.dumps(led.state_dict())))
    assert other.spent(1) == led.spent(1) and other.spent("site-b") == 2.0
    assert other.spent("1") == 0.0  # int ids stay ints through JSON
    with pytest.raises(ConfigError):
        led.charge(1, -0.1)


def test_guard_stops_laplace_rounds_before_the_target() -> None:
    led, guard = PureEpsilonLedger(), BudgetGuard(2.0)
    rounds = 0
    with pytest.raises(PrivacyBudgetExceeded) as err:
        while True:
            guard.check(led.epsilon_if(0, 0.3), spent_epsilon=led.spent(0), what="next round")
            led.charge(0, 0.3)
            rounds += 1
    assert rounds == 6 and led.spent(0) == pytest.approx(1.8)
    msg = str(err.value)
    assert "2.1000" in msg and "1.8000" in msg and "2.0000" in msg and "next round" in msg


def test_guard_stops_gaussian_steps_before_the_target() -> None:
    acc, guard = GaussianAccountant("rdp", DELTA), BudgetGuard(2.5, DELTA)
    rounds = 0
    with pytest.raises(PrivacyBudgetExceeded, match=r"over the target 2\.5000"):
        for _ in range(10_000):
            guard.check(acc.epsilon_if(1.0, 0.01, 100), spent_epsilon=acc.epsilon())
            acc.step(1.0, 0.01, 100)
            rounds += 1
    assert rounds >= 3 and 1.5 < acc.epsilon() <= 2.5
    assert acc.epsilon_if(1.0, 0.01, 100) > 2.5
    assert guard.allows(2.5) and not guard.allows(2.5 + 1e-9)
    with pytest.raises(PrivacyBudgetExceeded):
        guard.check(float("nan"))
