"""Name -> bit policy registry (Opacus-style: the allowed values in errors come from the keys)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fedq.adapt.base import BitPolicy
from fedq.adapt.budget import BudgetBits
from fedq.adapt.schedules import ClientEntropyBits, CosineBits, FixedBits
from fedq.errors import ConfigError

#: Scenario name of each policy -> its constructor.
POLICIES: dict[str, Callable[..., BitPolicy]] = {
    "fixed": FixedBits,
    "cosine": CosineBits,
    "client_entropy": ClientEntropyBits,
    "budget": BudgetBits,
}


def make_policy(name: str, **params: Any) -> BitPolicy:
    """Build the policy registered as ``name`` with ``params``.

    Unknown names, unknown or missing parameters and invalid values all raise
    :class:`~fedq.errors.ConfigError` naming what is allowed.
    """
    factory = POLICIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown bit policy {name!r}; allowed: {', '.join(sorted(POLICIES))}")
    sig = inspect.signature(factory)
    allowed = list(sig.parameters)
    unknown = sorted(set(params) - set(allowed))
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty and p.name not in params
    ]
    problems = [f"bit policy {name!r}: unknown parameter {k!r}" for k in unknown]
    problems += [f"bit policy {name!r}: missing parameter {k!r}" for k in missing]
    if problems:
        problems.append(f"bit policy {name!r} takes: {', '.join(allowed)}")
        raise ConfigError(problems)
    return factory(**params)
