"""Run files: ``metrics.jsonl`` (one JSON object per round or eval step), ``config.json``,
``summary.json`` (docs/design.md §5).

Metrics are appended and flushed line by line, so a run stopped with Ctrl-C keeps every finished
round; :func:`read_metrics` skips a torn last line. Values are made strict JSON: tensors and numpy
scalars become numbers or lists, and NaN / Inf become ``null`` (``jq`` and browsers reject NaN).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


def to_json_value(value: Any) -> Any:
    """Recursively turn ``value`` into plain, strict-JSON data (non-finite floats -> None)."""
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str | int | bool) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    tolist = getattr(value, "tolist", None)  # torch tensors, numpy arrays and scalars
    if callable(tolist):
        return to_json_value(tolist())
    raise TypeError(f"cannot write {type(value).__name__} to a metrics file: {value!r}")


class MetricsWriter:
    """Appends records to ``out_dir/metrics.jsonl`` and keeps the ones it wrote in :attr:`records`.

    An existing file is appended to (a resumed run continues its log; nothing is overwritten).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        self.records: list[dict[str, Any]] = []
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record (flushed at once); returns the JSON-clean copy that was written."""
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        clean = to_json_value(record)
        self._file.write(json.dumps(clean, sort_keys=True, allow_nan=False) + "\n")
        self._file.flush()
        self.records.append(clean)
        return clean

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (or of ``DIR/metrics.jsonl`` given a folder).

    A torn last line (the process died mid-write) is skipped with a warning; a bad line anywhere
    else is corruption and raises ``ValueError`` naming the line.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    lines = p.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                log.warning("%s: skipping torn last line %d", p, i)
                break
            raise ValueError(f"{p}: line {i} is not valid JSON: {e}") from e
    return records


def _write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write sorted, indented strict JSON atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(to_json_value(data), sort_keys=True, indent=2, allow_nan=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_summary(out_dir: str | os.PathLike[str], summary: Mapping[str, Any]) -> Path:
    """Write ``out_dir/summary.json`` (see :func:`fedq.report.summarize`)."""
    return _write_json(Path(out_dir) / SUMMARY_FILE, summary)


def write_config(out_dir: str | os.PathLike[str], config: Mapping[str, Any]) -> Path:
    """Write the resolved run config to ``out_dir/config.json`` (sorted keys, indent 2)."""
    return _write_json(Path(out_dir) / CONFIG_FILE, config)
