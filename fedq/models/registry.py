"""The model registry of every mode: one :class:`ModelEntry` per model name, saying which modes
train it, the width of its residual stream, and how it is built.

A whole-model builder is a plain function ``fn(*, num_classes, input_dim, seed, **options) ->
ModelBundle`` (federated mode trains it; :func:`build_model` checks the options against the
builder's signature and seeds torch in a forked RNG, so the same seed gives the same initial
weights without disturbing the caller's random state). ``family`` names the architecture a split
cut follows (``bert``: an encoder :func:`build_model` builds; ``llama``: a causal LM that
:mod:`fedq.split.models` builds itself). Adding a model is one :func:`register_model` (a builder)
or one :func:`add_model` (an entry only a mode's own builder makes) call.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from fedq.errors import ConfigError
from fedq.models.bundle import ModelBundle

Builder = Callable[..., ModelBundle]
B = TypeVar("B", bound=Builder)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One registered model: the ``modes`` that train it, ``build`` (the whole model as a
    :class:`ModelBundle`; None for a model only a mode's own builder makes), ``width`` (its
    residual stream's width when its checkpoint fixes it; None: the scenario's ``model.hidden``),
    ``family`` (the architecture a split cut follows, None when it cannot be cut) and ``task``
    (``classification`` or ``causal_lm``: the data it trains on; ``model.task`` may override it
    for a Hugging Face checkpoint); ``base`` locates the frozen base's files when the model
    has one that every party loads itself."""

    name: str
    modes: tuple[str, ...]
    build: Builder | None = None
    width: int | None = None
    family: str | None = None
    task: str = "classification"
    #: Where the frozen base's files are (a Hugging Face checkpoint), for its fingerprint;
    #: called only when needed (it may build the files, as the packaged SmolLM2 does).
    base: Callable[[], str] | None = None

    def hidden(self, configured: int) -> int:
        """The residual width of this model with ``model.hidden = configured``."""
        return self.width if self.width is not None else configured


_ENTRIES: dict[str, ModelEntry] = {}
_BUILDERS: dict[str, Builder] = {}
#: Prefix -> resolver of names ``"<prefix>:<arg>"`` (``hf:PATH``): ``resolve(name, arg)`` returns
#: the entry (reading at most a config file) or raises ConfigError saying what is missing.
_SOURCES: dict[str, Callable[[str, str], ModelEntry]] = {}
_SOURCE_MODES: dict[str, tuple[str, ...]] = {}
_COMMON = ("num_classes", "input_dim", "seed")
#: Fields of a scenario's ``model`` section that every builder accepts (and may ignore).
SHARED_OPTIONS = frozenset(
    {
        "hidden",
        "lora_r",
        "lora_alpha",
        "max_length",
        "lora",
        "task",
        "base_bits",
        "base_group_size",
        "base_budget_mb",
        "gradient_checkpointing",
        "base_lowrank_init",
    }
)
log = logging.getLogger(__name__)


def add_model(entry: ModelEntry) -> None:
    """Register ``entry`` (a name registers once)."""
    if entry.name in _ENTRIES:
        raise ValueError(f"duplicate model name {entry.name!r}")
    _ENTRIES[entry.name] = entry
    if entry.build is not None:
        _BUILDERS[entry.name] = entry.build


def register_model(
    name: str,
    *,
    modes: Sequence[str] = ("federated",),
    width: int | None = None,
    family: str | None = None,
) -> Callable[[B], B]:
    """Decorator: register a whole-model builder under ``name`` (:class:`ModelEntry`)."""

    def deco(fn: B) -> B:
        add_model(ModelEntry(name, tuple(modes), fn, width, family))
        return fn

    return deco


def register_model_source(
    prefix: str, resolve: Callable[[str, str], ModelEntry], modes: Sequence[str]
) -> None:
    """Register ``resolve(name, arg) -> ModelEntry`` for model names ``"<prefix>:<arg>"``;
    ``modes`` are the modes some of its models serve (each entry says which it does)."""
    if prefix in _SOURCES or ":" in prefix:
        raise ValueError(f"bad or duplicate model source prefix {prefix!r}")
    _SOURCES[prefix] = resolve
    _SOURCE_MODES[prefix] = tuple(modes)


def remove_model(name: str) -> None:
    """Remove a registered model (a test that registered its own)."""
    _ENTRIES.pop(name, None)
    _BUILDERS.pop(name, None)


def model_entry(name: str) -> ModelEntry | None:
    """The entry registered as ``name`` or resolved by its source (``hf:PATH``), or None. A
    source name whose argument is unusable raises :class:`ConfigError` saying why."""
    if name in _ENTRIES:
        return _ENTRIES[name]
    prefix, sep, arg = name.partition(":")
    if sep and prefix in _SOURCES:
        if not arg:
            raise ConfigError(f"model {name!r}: missing the part after {prefix + ':'!r}")
        return _SOURCES[prefix](name, arg)
    return None


def check_model_name(name: str, mode: str) -> str | None:
    """The problem with ``name`` as the model of ``mode`` (unknown, another mode's, or a source
    whose checkpoint is unusable), or None."""
    try:
        entry = model_entry(name)
    except ConfigError as e:
        return "; ".join(e.problems)
    if entry is not None and mode in entry.modes:
        return None
    known = [e.name for e in models_for(mode)]
    known += [f"{p}:PATH" for p in sorted(_SOURCES) if mode in _SOURCE_MODES[p]]
    if entry is not None and name not in _ENTRIES:  # a source's model, another mode's
        return f"{name!r} cannot be trained by mode {mode!r} (it serves {', '.join(entry.modes)})"
    return f"unknown {name!r} for mode {mode!r}; registered: {', '.join(known)}"


def models_for(mode: str) -> list[ModelEntry]:
    """The entries ``mode`` trains, in the order they were registered."""
    return [e for e in _ENTRIES.values() if mode in e.modes]


def model_names() -> list[str]:
    """The models :func:`build_model` builds (whole-model builders), sorted."""
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
    entry = model_entry(name)
    if entry is None or entry.build is None:
        known = model_names() + [f"{p}:PATH" for p in sorted(_SOURCES)]
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(known)}")
    fn = entry.build
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
        bundle = fn(num_classes=num_classes, input_dim=input_dim, seed=seed, **options)
    bundle.input_dim = input_dim
    return bundle
