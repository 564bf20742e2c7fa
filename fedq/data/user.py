"""User data sources: ``npz:PATH``, ``csv:PATH``, ``parquet:PATH`` and ``py:module:function``
(``jsonl:PATH`` is in :mod:`fedq.data.instruct`).

Each turns the user's files into the same :class:`DataSplit` the built-ins return, so partitioners,
models and reports never special-case user data. Problems (missing file, a file that is not UTF-8
or not an npz, missing arrays or columns, NaN/Inf features, labels that are not class indices)
raise :class:`ConfigError` naming the file and what is wrong, before training starts.

Labels, the same rule for every source: integers (or whole-number floats, or strings that all
parse as integers) are class ids as they are, and must be ``>= 0``; any other strings are class
names, numbered in sorted order (``["neg", "pos"] -> 0, 1``; files read by different sites must
then hold the same names). Fractional, negative or NaN labels are errors.
"""

from __future__ import annotations

import codecs
import csv
import importlib
import inspect
import io
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedq.data.datasets import ArrayDataset, DataSplit, TextDataset
from fedq.data.holdout import stratified_holdout
from fedq.data.registry import register_source
from fedq.errors import ConfigError

#: The most classes a label column may imply: ids are class indices (the model's head has
#: ``max + 1`` outputs), so a larger id is almost surely a regression target or a raw key.
MAX_CLASSES = 10_000


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def encode_labels(values: Sequence[Any] | np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """Map raw labels to ``int64`` class ids; return ``(ids, num_classes)``.

    Integer labels (booleans, whole-number floats, or strings that all parse as integers) are
    kept as they are and ``num_classes = max + 1``, so a class missing from a small file keeps
    its id. Any other strings become ids in sorted order (``["neg", "pos"] -> 0, 1``), which is
    stable across files that hold the same class names. Negative, fractional or NaN labels, and
    ids that imply more than :data:`MAX_CLASSES` classes, are a :class:`ConfigError` naming the
    first bad row.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ConfigError(f"{where}: labels must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        ids = arr.astype(np.int64)
    elif arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = _first(bad)
            raise ConfigError(
                f"{where}: labels must be class indices (whole numbers), got "
                f"{arr[i].item()} at row {i} ({_rows(int(bad.sum()))} in "
                "all)"
            )
        ids = arr.astype(np.int64)
    elif arr.dtype.kind in "US":
        strings = [(v.decode() if isinstance(v, bytes) else str(v)).strip() for v in arr]
        if "" in strings:
            raise ConfigError(f"{where}: empty label at row {strings.index('')}")
        try:
            ids = np.asarray([int(s) for s in strings], dtype=np.int64)
        except ValueError:
            classes = sorted(set(strings))
            if len(classes) > MAX_CLASSES:
                raise ConfigError(
                    f"{where}: {len(classes)} distinct label names; labels must be classes"
                ) from None
            lookup = {c: i for i, c in enumerate(classes)}
            return np.asarray([lookup[s] for s in strings], dtype=np.int64), len(classes)
    else:
        raise ConfigError(f"{where}: labels must be integers or strings, got dtype {arr.dtype}")
    if ids.size and ids.min() < 0:
        i = _first(ids < 0)
        raise ConfigError(
            f"{where}: labels must be class indices >= 0, got {int(ids[i])} at row {i}"
        )
    if ids.size and int(ids.max()) >= MAX_CLASSES:
        raise ConfigError(
            f"{where}: labels must be class indices, got {int(ids.max())} (a "
            f"{int(ids.max()) + 1}-class model; more than {MAX_CLASSES:,} classes "
            "is not a classification task)"
        )
    return ids, int(ids.max()) + 1 if ids.size else 1


def _existing(path: str, kind: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{kind} data file not found: {p}")
    return p


def check_features(x: np.ndarray, where: str) -> None:
    """Features must be numeric and, as floats, finite: a NaN or Inf feature makes every loss NaN
    (the run would "finish" with a useless model)."""
    if x.ndim < 2:
        raise ConfigError(f"{where}: features must have shape (rows, features...), got {x.shape}")
    if x.dtype.kind not in "iuf":
        raise ConfigError(f"{where}: features must be numeric, got dtype {x.dtype}")
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise ConfigError(
                f"{where}: {_rows(int(bad.sum()))} with NaN or Inf features "
                f"(first: row {_first(bad)}); drop or impute them"
            )


def _features(x: np.ndarray, where: str) -> torch.Tensor:
    """Float features become float32; integer arrays are token ids and stay int64."""
    check_features(x, where)
    if x.dtype.kind in "iu":
        return torch.from_numpy(x.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def arrays_to_split(
    x: np.ndarray,
    y: Sequence[Any] | np.ndarray,
    name: str,
    *,
    x_test: np.ndarray | None = None,
    y_test: Sequence[Any] | np.ndarray | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    where: str | None = None,
) -> DataSplit:
    """Arrays -> :class:`DataSplit`; without a test set, a stratified holdout by ``seed``.
    Problems name ``where`` (the file), else ``name``."""
    x = np.asarray(x)
    at = where or name
    n_train = len(x)
    if (x_test is None) != (y_test is None):
        raise ConfigError(f"{at}: give both x_test and y_test, or neither")
    if n_train == 0:
        raise ConfigError(f"{at}: x has no rows")
    y_all = np.asarray(y) if y_test is None else np.concatenate([np.asarray(y), np.asarray(y_test)])
    ids, k = encode_labels(y_all, at)
    if len(ids) != n_train + (0 if x_test is None else len(x_test)):
        raise ConfigError(f"{at}: x and y have different numbers of rows")
    xt = _features(x, f"{at}: x")
    yt = torch.from_numpy(ids)
    if x_test is None:
        tr, te = stratified_holdout(ids, test_fraction, seed)
        tri, tei = torch.from_numpy(tr), torch.from_numpy(te)
        return DataSplit(
            ArrayDataset(xt[tri], yt[tri], k, name), ArrayDataset(xt[tei], yt[tei], k, name)
        )
    return DataSplit(
        ArrayDataset(xt, yt[:n_train], k, name),
        ArrayDataset(_test_features(x_test, x, at), yt[n_train:], k, name),
    )


def _test_features(x_test: np.ndarray, x: np.ndarray, name: str) -> torch.Tensor:
    x_test = np.asarray(x_test)
    if x_test.shape[1:] != x.shape[1:]:
        raise ConfigError(
            f"{name}: x_test rows have shape {x_test.shape[1:]}, x rows {x.shape[1:]}"
        )
    return _features(x_test, f"{name}: x_test")


@register_source("npz")
def load_npz(path: str, seed: int = 0, test_fraction: float = 0.2) -> DataSplit:
    """Arrays ``x`` / ``y`` (optional ``x_test`` / ``y_test``) from a ``.npz`` (pickles refused)."""
    p = _existing(path, "npz")
    how = "write one with numpy.savez(path, x=features, y=labels)"
    with p.open("rb") as f:
        head = f.read(6)
    if head.startswith(b"\x93NUMPY"):
        raise ConfigError(f"{p}: a single .npy array, not an npz; {how}")
    if not head.startswith(b"PK"):
        raise ConfigError(f"{p}: not an npz file (no zip signature at its start); {how}")
    try:
        z = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{p}: not an npz file ({_why(e)}); {how}") from None
    with z:
        missing = [k for k in ("x", "y") if k not in z.files]
        if missing:
            raise ConfigError(f"{p}: missing arrays {missing} (found {sorted(z.files)})")
        try:
            arrays = {k: z[k] for k in z.files}
        except ValueError as e:  # object arrays need pickle
            raise ConfigError(f"{p}: not an npz of plain arrays ({_why(e)})") from None
        except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            raise ConfigError(f"{p}: a corrupt npz file ({_why(e)})") from None
    return arrays_to_split(
        arrays["x"],
        arrays["y"],
        p.stem,
        x_test=arrays.get("x_test"),
        y_test=arrays.get("y_test"),
        seed=seed,
        test_fraction=test_fraction,
        where=str(p),
    )


def _why(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _utf8_text(p: Path) -> str:
    """The file as text; anything but UTF-8 (a byte-order mark is fine) is an error that says
    where the first undecodable byte is."""
    raw = p.read_bytes()
    skip = 3 if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw.count(b"\n", 0, at) + 1
        raise ConfigError(
            f"{p}: not UTF-8 text: byte 0x{raw[at]:02x} at offset {at} (line "
            f"{line}); save the file as UTF-8"
        ) from None


def _read_csv(p: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header (stripped names) and ``(line, row)`` of every row of a UTF-8 CSV file."""
    try:
        reader = csv.DictReader(io.StringIO(_utf8_text(p), newline=""))
        fields = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = fields
        rows = [(reader.line_num, r) for r in reader]
    except csv.Error as e:
        raise ConfigError(f"{p}: not a readable CSV file ({e})") from None
    if not rows:
        raise ConfigError(f"{p}: no rows")
    return fields, rows


def _text_rows(
    p: Path, fields: Sequence[str], rows: Sequence[tuple[int, dict[str, Any]]], unit: str = "line"
) -> Any:
    """``(texts, labels)`` of a ``text,label`` table; a row without either names its line (CSV)
    or row (Parquet, counted from 0)."""
    if "text" not in fields or "label" not in fields:
        raise ConfigError(f"{p}: need a header with columns 'text' and 'label', got {list(fields)}")
    for line, r in rows:
        for col in ("text", "label"):
            if r.get(col) is None:
                raise ConfigError(f"{p}: {unit} {line} has no {col} column")
    return [r["text"] for _, r in rows], [r["label"] for _, r in rows]


def _is_records(fields: Sequence[str]) -> bool:
    """A table of instruction or text records (no ``label`` column; an instruction/output, a
    messages or a text column), not a text classification table."""
    return "label" not in fields and bool(
        {"instruction", "output", "messages", "text"} & set(fields)
    )


def _table_records(
    p: Path, rows: Sequence[tuple[int, dict[str, Any]]], unit: str = "line"
) -> list[Any]:
    """Rows of a CSV or Parquet table as instruction records (the JSON Lines shapes of
    :mod:`fedq.data.instruct`); empty cells count as absent, so one file may mix shapes; a
    ``messages`` cell may hold the JSON list of turns. Problems name ``file:line`` (CSV) or
    ``file row N`` (Parquet)."""
    import json

    from fedq.data.instruct import parse_record

    out = []
    for n, row in rows:
        at = f"{p}:{n}" if unit == "line" else f"{p} row {n}"
        obj = {k: v for k, v in row.items() if v is not None and v != ""}
        msgs = obj.get("messages")
        if isinstance(msgs, str):
            try:
                obj["messages"] = json.loads(msgs)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{at}: messages is not a JSON list ({e.msg})") from None
        out.append(parse_record(obj, at))
    return out


def _text_split(
    p: Path,
    train: tuple[list[str], list[Any]],
    test: tuple[list[str], list[Any]] | None,
    seed: int,
    test_fraction: float,
) -> DataSplit:
    """Text classification rows -> DataSplit: labels of both files mapped together; without a
    test file, a stratified holdout by ``seed``."""
    texts, raw = train
    ids, k = encode_labels(np.asarray(raw + (test[1] if test else [])), str(p))
    n = len(texts)
    y = torch.from_numpy(ids)
    if test is not None:
        return DataSplit(
            TextDataset(texts, y[:n], k, p.stem), TextDataset(test[0], y[n:], k, p.stem)
        )
    tr, te = stratified_holdout(ids[:n], test_fraction, seed)
    return DataSplit(
        TextDataset([texts[i] for i in tr], y[torch.from_numpy(tr)], k, p.stem),
        TextDataset([texts[i] for i in te], y[torch.from_numpy(te)], k, p.stem),
    )


def _records_split(
    p: Path, records: list[Any], test: list[Any] | None, seed: int, test_fraction: float
) -> DataSplit:
    from fedq.data.instruct import records_to_split

    return records_to_split(records, p.stem, test=test, seed=seed, test_fraction=test_fraction)


@register_source("csv")
def load_csv(
    path: str, seed: int = 0, test_fraction: float = 0.2, test_path: str | None = None
) -> DataSplit:
    """A CSV file with a header: text classification (columns ``text`` and ``label``; labels may
    be strings), or instruction records for a causal LM (no ``label`` column; ``instruction``,
    ``input``, ``output``, or ``messages`` as a JSON list, or ``text``).

    With ``test_path`` that file is the test set (labels mapped together with the train file's);
    otherwise a holdout by ``seed`` (stratified by label for classification).
    """
    p = _existing(path, "csv")
    fields, rows = _read_csv(p)
    q = _existing(test_path, "csv") if test_path is not None else None
    if _is_records(fields):
        test = None if q is None else _table_records(q, _read_csv(q)[1])
        return _records_split(p, _table_records(p, rows), test, seed, test_fraction)
    train = _text_rows(p, fields, rows)
    test_rows = None if q is None else _text_rows(q, *_read_csv(q))
    return _text_split(p, train, test_rows, seed, test_fraction)


def _read_parquet(p: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Column names and ``(N, row)`` of a Parquet file (pyarrow, the ``parquet`` extra)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{p}: reading Parquet needs pyarrow (pip install 'fedq[parquet]')"
        ) from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow's ArrowInvalid / OSError for what is not Parquet
        raise ConfigError(f"{p}: not a readable Parquet file ({_why(e)})") from None
    rows = list(enumerate(table.to_pylist()))
    if not rows:
        raise ConfigError(f"{p}: no rows")
    return list(table.column_names), rows


@register_source("parquet")
def load_parquet(
    path: str, seed: int = 0, test_fraction: float = 0.2, test_path: str | None = None
) -> DataSplit:
    """A Parquet file with the columns of :func:`load_csv`: ``text`` and ``label`` for text
    classification, or instruction records (``messages`` may be a list of role/content
    structs, as Hugging Face data sets store chats)."""
    p = _existing(path, "parquet")
    fields, rows = _read_parquet(p)
    q = _existing(test_path, "parquet") if test_path is not None else None
    if _is_records(fields):
        test = None if q is None else _table_records(q, _read_parquet(q)[1], "row")
        return _records_split(p, _table_records(p, rows, "row"), test, seed, test_fraction)
    train = _text_rows(p, fields, rows, "row")
    test_rows = None if q is None else _text_rows(q, *_read_parquet(q), "row")
    return _text_split(p, train, test_rows, seed, test_fraction)


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
        for side, ds in (("train", out.train), ("test", out.test)):
            if isinstance(ds, ArrayDataset):
                check_features(ds.x.numpy(), f"py:{spec}: {side}.x")
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
