"""``report.png``: the few curves that answer "what did the bits buy?" for one run.

(a) accuracy vs round, (b) accuracy vs cumulative wire bytes (up + down; the paper's
accuracy-vs-bytes comparison against fp32, docs/algorithms.md §2.1), (c) mean bits vs round, and
(d) ε vs round when the run is private; a causal LM's run plots perplexity in place of accuracy.
matplotlib is imported here, lazily, and drawn through the Agg canvas directly, so importing fedq
stays fast and no global pyplot backend is touched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Cumulative bytes spanning more than this ratio (two decades) get a log x-axis.
LOG_X_SPAN = 100.0


def _series(
    records: Sequence[Mapping[str, Any]], x_of: Sequence[float | None], key: str
) -> tuple[list[float], list[float]]:
    """Points (x, record[key]) where both exist (train-only rows have no accuracy)."""
    pts = [
        (float(x), float(r[key]))
        for x, r in zip(x_of, records, strict=True)
        if x is not None and r.get(key) is not None
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def cumulative_wire_bytes(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Running total of ``bytes_up + bytes_down`` after each record (missing counts as 0)."""
    total, out = 0.0, []
    for r in records:
        total += float(r.get("bytes_up") or 0) + float(r.get("bytes_down") or 0)
        out.append(total)
    return out


def use_log_x(xs: Sequence[float]) -> bool:
    """True when the positive values span more than two decades."""
    pos = [x for x in xs if x > 0]
    return bool(pos) and max(pos) / min(pos) > LOG_X_SPAN


def plot_report(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Draw the run report to ``path`` (PNG). Works for any number of records, including 0."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not records:
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        fig.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=20)
        fig.savefig(out, format="png", dpi=100)
        return out

    rounds = [r.get("round") for r in records]
    private = any(r.get("epsilon") is not None for r in records)
    fig = Figure(figsize=(11, 8) if private else (15, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel() if private else fig.subplots(1, 3)

    # a causal LM reports held-out perplexity, not accuracy
    metric = (
        "perplexity"
        if not any(r.get("accuracy") is not None for r in records)
        and any(r.get("perplexity") is not None for r in records)
        else "accuracy"
    )
    ax = axes[0]
    ax.plot(*_series(records, rounds, metric), marker="o", ms=3)
    ax.set(title=f"(a) {metric} vs round", xlabel="round", ylabel=metric)

    ax = axes[1]
    wire = cumulative_wire_bytes(records)
    xs, ys = _series(records, wire, metric)
    if use_log_x(wire):
        xs, ys = [x for x in xs if x > 0], [y for x, y in zip(xs, ys, strict=True) if x > 0]
        ax.set_xscale("log")
    ax.plot(xs, ys, marker="o", ms=3)
    ax.set(
        title=f"(b) {metric} vs wire bytes", xlabel="cumulative bytes (up + down)", ylabel=metric
    )

    ax = axes[2]
    ax.plot(*_series(records, rounds, "mean_bits"), marker="o", ms=3)
    ax.set(title="(c) mean bits vs round", xlabel="round", ylabel="mean bits")

    if private:
        ax = axes[3]
        ax.plot(*_series(records, rounds, "epsilon"), marker="o", ms=3)
        ax.set(title="(d) ε spent vs round", xlabel="round", ylabel="ε")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    return out
