"""Sweep outputs: ``sweep.csv``, ``sweep.md`` and plots of accuracy against epsilon and bytes."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

COLUMNS = (
    "final_accuracy",
    "best_accuracy",
    "epsilon_spent",
    "bytes_wire_total",
    "compression_ratio",
    "rounds_completed",
    "stopped_reason",
    "wall_seconds",
)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.4g}"
    return str(v)


def write_sweep_outputs(out: Path, rows: list[dict[str, Any]], axes: list[str]) -> None:
    cols = ["label", *axes, *COLUMNS]
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_fmt(r.get(c)) for c in cols])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    _plots(out, rows, axes)


def _plots(out: Path, rows: list[dict[str, Any]], axes: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    eps_axis = next((a for a in axes if "epsilon" in a), None)
    series = [a for a in axes if a != eps_axis]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = ", ".join(f"{a}={r.get(a)}" for a in series) or "runs"
        groups.setdefault(key, []).append(r)
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for key, rs in groups.items():
        pts = []
        for r in rs:
            e = r.get(eps_axis) if eps_axis else r.get("epsilon_spent")
            e = r.get("epsilon_spent") if e is None else e
            if e is None or r.get("final_accuracy") is None:
                continue
            pts.append((float(e), r["final_accuracy"]))
        finite = sorted(p for p in pts if math.isfinite(p[0]))
        if finite:
            ax1.plot(*zip(*finite, strict=True), marker="o", label=key)
        for e, a in pts:
            if not math.isfinite(e):
                ax1.axhline(a, linestyle=":", linewidth=1, color="grey")
        b = [
            (r["bytes_wire_total"], r["final_accuracy"])
            for r in rs
            if r.get("bytes_wire_total") and r.get("final_accuracy") is not None
        ]
        if b:
            ax2.scatter(*zip(*b, strict=True), label=key)
    ax1.set_xscale("log")
    ax1.set_xlabel("epsilon (dotted: no DP)")
    ax1.set_ylabel("final test accuracy")
    ax1.set_title("accuracy vs privacy budget")
    ax2.set_xscale("log")
    ax2.set_xlabel("total wire bytes")
    ax2.set_title("accuracy vs bytes sent")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
