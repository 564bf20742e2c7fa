"""Name registries of :mod:`fedq.adapt` (Opacus-style: the allowed values in errors come from the
keys): bit policies of the federated links, and codecs of the split-learning cut."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fedq.adapt.amaq import (
    AmaqQuantizer,
    FixedQuantizer,
    GateSignal,
    IdentityQuantizer,
    QuantRange,
)
from fedq.adapt.aqsgd import DeltaQuantizer
from fedq.adapt.base import BitPolicy
from fedq.adapt.budget import BudgetBits
from fedq.adapt.cut import CutCodec, Direction
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


#: Scenario name of each split-cut codec (``split.act_codec`` / ``split.grad_codec``) -> class.
CUT_CODECS: dict[str, type[CutCodec]] = {
    c.name: c for c in (AmaqQuantizer, FixedQuantizer, IdentityQuantizer, DeltaQuantizer)
}


def make_cut_codec(
    name: str,
    direction: Direction,
    *,
    width: int,
    seed: int = 0,
    fixed_bits: float = 4,
    quant_range: QuantRange = "mse",
    outlier_ratio: float = 0.0,
    b_min: int = 2,
    b_max: int = 8,
    init_bits: float = 7.5,
    gate_signal: GateSignal = "task",
) -> CutCodec:
    """The codec registered as ``name`` for one direction of a cut of ``width`` channels.

    Fixed per direction (docs/algorithms.md §5): both directions code per channel with per-token
    row scales; activations use float16 scales, gradients float32 scales (they are tiny) and
    unbiased stochastic rounding seeded by ``seed``; outlier rows only for activations.
    """
    cls = CUT_CODECS.get(name)
    if cls is None:
        raise ConfigError(f"unknown cut codec {name!r}; allowed: {', '.join(sorted(CUT_CODECS))}")
    if direction not in cls.directions:
        raise ConfigError(f"cut codec {name!r} cannot code direction {direction!r}")
    if cls is IdentityQuantizer:
        return IdentityQuantizer(direction)
    act = direction == "act"
    common: dict[str, Any] = {
        "scale_dtype": "float16" if act else "float32",
        "stochastic": not act,
        "seed": seed,
        "quant_range": quant_range,
        "row_scale": True,
        "outlier_ratio": outlier_ratio if act else 0.0,
        "direction": direction,
    }
    if issubclass(cls, FixedQuantizer):  # fixed and aqsgd
        return cls(fixed_bits, **common)
    signal: GateSignal = gate_signal if act else "task"
    return AmaqQuantizer(
        width, b_min=b_min, b_max=b_max, init_bits=init_bits, signal=signal, **common
    )
