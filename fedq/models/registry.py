"""Name -> builder registry behind :func:`build_model`.

Builders are plain functions ``fn(*, num_classes, input_dim, seed, **options) -> ModelBundle``.
``build_model`` checks the options against the builder's signature and seeds torch in a forked RNG,
so the same seed gives the same initial weights without disturbing the caller's random state.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from fedq.errors import ConfigError
from fedq.models.bundle import ModelBundle

Builder = Callable[..., ModelBundle]
B = TypeVar("B", bound=Builder)

_BUILDERS: dict[str, Builder] = {}
_COMMON = ("num_classes", "input_dim", "seed")
#: Fields of a scenario's ``model`` section that every builder accepts (and may ignore).
SHARED_OPTIONS = frozenset({"hidden", "lora_r", "lora_alpha", "max_length"})
log = logging.getLogger(__name__)


def register_model(name: str) -> Callable[[B], B]:
    """Decorator: register a builder under ``name``."""

    def deco(fn: B) -> B:
        if name in _BUILDERS:
            raise ValueError(f"duplicate model name {name!r}")
        _BUILDERS[name] = fn
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def build_model(
    name: str, *, num_classes: int, input_dim: int | None = None, seed: int, **kw: Any
) -> ModelBundle:
    """Build a registered model with its options.

    The scenario's shared model fields (:data:`SHARED_OPTIONS`, e.g. ``hidden`` and ``lora_r``) may
    be passed to any builder; one that does not use a field ignores it, so a single config section
    serves every model. Any other unknown option, or an unknown name, raises :class:`ConfigError`
    listing what is allowed.
    """
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(model_names())}")
    fn = _BUILDERS[name]
    allowed = [p for p in inspect.signature(fn).parameters if p not in _COMMON]
    problems = [
        f"model {name!r}: unknown option {k!r} (allowed: {allowed})"
        for k in sorted(kw)
        if k not in allowed and k not in SHARED_OPTIONS
    ]
    if num_classes < 1:
        problems.append(f"model {name!r}: num_classes must be >= 1, got {num_classes}")
    if problems:
        raise ConfigError(problems)
    ignored = sorted(k for k in kw if k not in allowed)
    if ignored:
        log.debug("model %r does not use %s; ignored", name, ignored)
    options = {k: v for k, v in kw.items() if k in allowed}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(num_classes=num_classes, input_dim=input_dim, seed=seed, **options)
