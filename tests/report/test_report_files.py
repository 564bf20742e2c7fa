"""Run files: metrics.jsonl appended and flushed line by line, config/summary JSON, report.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedq.report import (
    MetricsWriter,
    plot_report,
    read_metrics,
    write_config,
    write_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records() -> list[dict[str, object]]:
    return [
        {
            "round": 0,
            "accuracy": None,
            "loss": 2.3,
            "bytes_up": 1000,
            "bytes_down": 4000,
            "bytes_fp32": 20000,
            "mean_bits": 32.0,
            "epsilon": 0.5,
        },
        {
            "round": 1,
            "accuracy": 0.4,
            "loss": 1.5,
            "bytes_up": 800,
            "bytes_down": 3000,
            "bytes_fp32": 20000,
            "mean_bits": 24.0,
            "epsilon": 1.0,
        },
        {
            "round": 2,
            "accuracy": 0.7,
            "loss": 0.9,
            "bytes_up": 500,
            "bytes_down": 2000,
            "bytes_fp32": 20000,
            "mean_bits": 12.0,
            "epsilon": 1.5,
        },
    ]


def test_metrics_writer_flushes_each_line(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "run")
    for rec in _records():
        writer.write(rec)
        # readable from disk before close: a Ctrl-C now keeps what was written
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1]) == rec
    assert len(writer.records) == 3
    writer.close()
    assert read_metrics(tmp_path / "run") == _records()
    with pytest.raises(ValueError, match="closed"):
        writer.write({"round": 3})


def test_metrics_writer_appends_and_cleans_values(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as w:
        w.write({"round": 0, "accuracy": 0.5})
    with MetricsWriter(tmp_path) as w:
        clean = w.write(
            {
                "round": 1,
                "accuracy": torch.tensor(0.25),
                "loss": float("nan"),
                "bits": torch.tensor([4, 8]),
                "n": np.int64(7),
                "eps": math.inf,
            }
        )
        assert w.records == [clean]  # only what this writer wrote
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"round": 0, "accuracy": 0.5},
        {"round": 1, "accuracy": 0.25, "loss": None, "bits": [4, 8], "n": 7, "eps": None},
    ]


def test_metrics_writer_rejects_unserializable(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as w, pytest.raises(TypeError, match="object"):
        w.write({"round": 0, "thing": object()})


def test_read_metrics_skips_torn_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "accu')
    assert read_metrics(path) == [{"round": 0}, {"round": 1}]
    path.write_text('{"round": 0}\n{"rou\n{"round": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_write_config_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    cfg = {"z": 1, "a": {"y": [1, 2], "b": 0.5}, "path": Path("/x")}
    p = write_config(out, cfg)
    assert p == out / "config.json"
    text = p.read_text()
    assert json.loads(text) == {"z": 1, "a": {"y": [1, 2], "b": 0.5}, "path": "/x"}
    assert text.index('"a"') < text.index('"path"') < text.index('"z"')  # sorted keys
    assert '\n  "a": {\n    "b": 0.5,' in text  # indent 2, nested keys sorted too
    s = write_summary(out, {"final_accuracy": 0.7, "compression_ratio": float("nan")})
    assert json.loads(s.read_text()) == {"compression_ratio": None, "final_accuracy": 0.7}
    assert not list(out.glob("*.tmp"))


def _assert_png(path: Path, min_size: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_size


def test_plot_report_full(tmp_path: Path) -> None:
    out = plot_report(_records(), tmp_path / "report.png")
    assert out == tmp_path / "report.png"
    _assert_png(out, 20000)


def test_plot_report_without_epsilon_and_wide_bytes(tmp_path: Path) -> None:
    recs = [
        {"round": t, "accuracy": 0.1 * t, "bytes_up": 10**t, "bytes_down": 0, "mean_bits": 8}
        for t in range(6)
    ]
    _assert_png(plot_report(recs, tmp_path / "a" / "report.png"), 20000)


def test_plot_report_one_and_zero_records(tmp_path: Path) -> None:
    _assert_png(plot_report(_records()[:1], tmp_path / "one.png"))
    empty = plot_report([], tmp_path / "zero.png")
    _assert_png(empty, 1000)
    # the "no data" figure differs from an empty set of axes
    assert empty.read_bytes() != (tmp_path / "one.png").read_bytes()


def test_importing_report_does_not_import_matplotlib() -> None:
    import subprocess
    import sys

    code = "import sys, fedq.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
