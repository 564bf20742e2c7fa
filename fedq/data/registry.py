"""Name -> loader registry behind :func:`load_dataset`.

Two kinds of entries: named data sets (``digits``) and sources with a prefix that carry an argument
(``npz:PATH``, ``csv:PATH``, ``py:module:function``). Error messages list what is registered, built
from the registry itself so they never go stale (the Opacus accountant registry does the same).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from fedq.data.datasets import DataSplit
from fedq.errors import ConfigError

Loader = Callable[..., DataSplit]
L = TypeVar("L", bound=Loader)

_NAMED: dict[str, Loader] = {}
_SOURCES: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[L], L]:
    """Decorator: register ``loader(**kw) -> DataSplit`` under ``name``."""

    def deco(fn: L) -> L:
        if name in _NAMED or ":" in name:
            raise ValueError(f"bad or duplicate data set name {name!r}")
        _NAMED[name] = fn
        return fn

    return deco


def register_source(prefix: str) -> Callable[[L], L]:
    """Decorator: register ``loader(arg, **kw) -> DataSplit`` for names ``"<prefix>:<arg>"``."""

    def deco(fn: L) -> L:
        if prefix in _SOURCES or ":" in prefix:
            raise ValueError(f"bad or duplicate data source prefix {prefix!r}")
        _SOURCES[prefix] = fn
        return fn

    return deco


def dataset_names() -> list[str]:
    """Everything :func:`load_dataset` accepts, e.g. ``["digits", ..., "csv:PATH", ...]``."""
    return sorted(_NAMED) + [f"{p}:..." for p in sorted(_SOURCES)]


def check_dataset_name(name: str) -> str | None:
    """The problem with ``name`` as a data set (unknown name or source prefix, a source without its
    argument), or None when :func:`load_dataset` knows it. Reads no data."""
    if name in _NAMED:
        return None
    prefix, sep, arg = name.partition(":")
    if not (sep and prefix in _SOURCES):
        return f"unknown data set {name!r}; registered: {', '.join(dataset_names())}"
    if not arg:
        return f"data set {name!r}: missing the part after {prefix + ':'!r}"
    return None


def dataset_options(name: str) -> list[str]:
    """The options the loader of ``name`` takes besides its source argument and the caps every
    data set takes (e.g. ``["seed", "generator_seed", "num_samples"]`` for mnist1d); empty for an
    unknown name. Reads no data."""
    if check_dataset_name(name) is not None:
        return []
    fn, skip = (_NAMED[name], 0) if name in _NAMED else (_SOURCES[name.partition(":")[0]], 1)
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]


def _check_kwargs(what: str, fn: Loader, kw: dict[str, Any], skip: int) -> None:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params] + ["max_train", "max_test"]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConfigError(
            [f"data set {what!r}: unknown option {k!r} (allowed: {allowed})" for k in unknown]
        )


def load_dataset(
    name: str, *, max_train: int | None = None, max_test: int | None = None, **kw: Any
) -> DataSplit:
    """Load a registered data set or user source by name; other options go to its loader.

    ``max_train`` / ``max_test`` work for every data set: they keep a random subset, seeded by the
    ``seed`` option when given (else 0). Raises :class:`ConfigError` naming the registered choices
    when ``name`` is unknown, and the allowed options when an option is unknown, before any data
    is read.
    """
    problem = check_dataset_name(name)
    if problem:
        raise ConfigError(problem)
    if name in _NAMED:
        fn = _NAMED[name]
        _check_kwargs(name, fn, kw, skip=0)
        split = fn(**kw)
    else:
        prefix, _, arg = name.partition(":")
        fn = _SOURCES[prefix]
        _check_kwargs(name, fn, kw, skip=1)
        split = fn(arg, **kw)
    if max_train is None and max_test is None:
        return split
    return split.capped(max_train, max_test, int(kw.get("seed", 0)))
