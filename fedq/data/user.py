"""User data sources: ``npz:PATH``, ``csv:PATH`` and ``py:module:function``.

Each turns the user's files into the same :class:`DataSplit` the built-ins return, so partitioners,
models and reports never special-case user data. Problems (missing file, missing column, labels that
are not classes) raise :class:`ConfigError` naming the file, before training starts.
"""

from __future__ import annotations

import csv
import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedq.data.datasets import ArrayDataset, DataSplit, TextDataset
from fedq.data.holdout import stratified_holdout
from fedq.data.registry import register_source
from fedq.errors import ConfigError


def encode_labels(values: Sequence[Any] | np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """Map raw labels to ``int64`` class ids; return ``(ids, num_classes)``.

    Integer labels (or strings that all parse as integers) are kept as they are and
    ``num_classes = max + 1``, so a class missing from a small file keeps its id. Any other strings
    become ids in sorted order (``["neg", "pos"] -> 0, 1``), which is stable across files.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ConfigError(f"{where}: labels must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        ids = arr.astype(np.int64)
    elif arr.dtype.kind in "US":
        strings = [str(v).strip() for v in arr]
        try:
            ids = np.asarray([int(s) for s in strings], dtype=np.int64)
        except ValueError:
            classes = sorted(set(strings))
            lookup = {c: i for i, c in enumerate(classes)}
            return np.asarray([lookup[s] for s in strings], dtype=np.int64), len(classes)
    else:
        raise ConfigError(f"{where}: labels must be integers or strings, got dtype {arr.dtype}")
    if ids.size and ids.min() < 0:
        raise ConfigError(f"{where}: integer labels must be >= 0, got {int(ids.min())}")
    return ids, int(ids.max()) + 1 if ids.size else 1


def _existing(path: str, kind: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{kind} data file not found: {p}")
    return p


def _features(x: np.ndarray) -> torch.Tensor:
    """Float features become float32; integer arrays are token ids and stay int64."""
    if x.dtype.kind in "iu":
        return torch.from_numpy(x.astype(np.int64))
    if x.dtype.kind == "f":
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise ConfigError(f"features must be numeric, got dtype {x.dtype}")


def arrays_to_split(
    x: np.ndarray,
    y: Sequence[Any] | np.ndarray,
    name: str,
    *,
    x_test: np.ndarray | None = None,
    y_test: Sequence[Any] | np.ndarray | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> DataSplit:
    """Arrays -> :class:`DataSplit`; without a test set, a stratified holdout by ``seed``."""
    x = np.asarray(x)
    n_train = len(x)
    if (x_test is None) != (y_test is None):
        raise ConfigError(f"{name}: give both x_test and y_test, or neither")
    y_all = np.asarray(y) if y_test is None else np.concatenate([np.asarray(y), np.asarray(y_test)])
    ids, k = encode_labels(y_all, name)
    if len(ids) != n_train + (0 if x_test is None else len(x_test)):
        raise ConfigError(f"{name}: x and y have different numbers of rows")
    xt = _features(x)
    yt = torch.from_numpy(ids)
    if x_test is None:
        tr, te = stratified_holdout(ids, test_fraction, seed)
        tri, tei = torch.from_numpy(tr), torch.from_numpy(te)
        return DataSplit(
            ArrayDataset(xt[tri], yt[tri], k, name), ArrayDataset(xt[tei], yt[tei], k, name)
        )
    return DataSplit(
        ArrayDataset(xt, yt[:n_train], k, name),
        ArrayDataset(_features(np.asarray(x_test)), yt[n_train:], k, name),
    )


@register_source("npz")
def load_npz(path: str, seed: int = 0, test_fraction: float = 0.2) -> DataSplit:
    """Arrays ``x`` / ``y`` (optional ``x_test`` / ``y_test``) from a ``.npz`` (pickles refused)."""
    p = _existing(path, "npz")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise ConfigError(f"{p}: missing arrays {missing} (found {sorted(z.files)})")
            arrays = {k: z[k] for k in z.files}
    except ConfigError:
        raise
    except (ValueError, OSError) as e:  # object arrays need pickle, or not an npz at all
        raise ConfigError(f"{p}: not a readable npz of plain arrays ({e})") from e
    return arrays_to_split(
        arrays["x"],
        arrays["y"],
        p.stem,
        x_test=arrays.get("x_test"),
        y_test=arrays.get("y_test"),
        seed=seed,
        test_fraction=test_fraction,
    )


def _read_text_csv(p: Path) -> tuple[list[str], list[str]]:
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "text" not in fields or "label" not in fields:
            raise ConfigError(f"{p}: need a header with columns 'text' and 'label', got {fields}")
        reader.fieldnames = fields
        rows = [(r["text"], r["label"]) for r in reader]
    if not rows:
        raise ConfigError(f"{p}: no rows")
    return [t for t, _ in rows], [lab for _, lab in rows]


@register_source("csv")
def load_csv(
    path: str, seed: int = 0, test_fraction: float = 0.2, test_path: str | None = None
) -> DataSplit:
    """Text classification from a CSV with a header ``text,label`` (labels may be strings).

    With ``test_path`` that file is the test set (labels mapped together with the train file's);
    otherwise a stratified holdout by ``seed``.
    """
    p = _existing(path, "csv")
    texts, raw = _read_text_csv(p)
    test_texts: list[str] = []
    if test_path is not None:
        test_texts, raw_test = _read_text_csv(_existing(test_path, "csv"))
        raw = raw + raw_test
    ids, k = encode_labels(np.asarray(raw, dtype=str), str(p))
    n = len(texts)
    y = torch.from_numpy(ids)
    if test_path is not None:
        return DataSplit(
            TextDataset(texts, y[:n], k, p.stem), TextDataset(test_texts, y[n:], k, p.stem)
        )
    tr, te = stratified_holdout(ids, test_fraction, seed)
    return DataSplit(
        TextDataset([texts[i] for i in tr], y[torch.from_numpy(tr)], k, p.stem),
        TextDataset([texts[i] for i in te], y[torch.from_numpy(te)], k, p.stem),
    )


@register_source("py")
def load_py(spec: str, seed: int = 0, test_fraction: float = 0.2, **kw: Any) -> DataSplit:
    """Call ``module:function(**kw)``; it returns a :class:`DataSplit`, ``(x, y)`` or
    ``(x, y, x_test, y_test)`` arrays.

    ``seed`` is passed on when the function takes it, and seeds the stratified holdout
    (``test_fraction``) of a bare ``(x, y)``; return a :class:`DataSplit` to split yourself.
    """
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise ConfigError(f"py data source must look like 'py:module:function', got 'py:{spec}'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"py data source: cannot import {module_name!r}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"py data source: {module_name!r} has no callable {fn_name!r}")
    params = inspect.signature(fn).parameters
    if "seed" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kw = {**kw, "seed": seed}
    out = fn(**kw)
    if isinstance(out, DataSplit):
        return out
    if isinstance(out, tuple) and len(out) in (2, 4):
        x_test, y_test = (out[2], out[3]) if len(out) == 4 else (None, None)
        return arrays_to_split(
            np.asarray(out[0]),
            out[1],
            fn_name,
            x_test=x_test,
            y_test=y_test,
            seed=seed,
            test_fraction=test_fraction,
        )
    raise ConfigError(
        f"py data source {spec!r} returned {type(out).__name__}; "
        "expected DataSplit, (x, y) or (x, y, x_test, y_test)"
    )
