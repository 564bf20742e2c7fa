"""``report.png`` of a split run: accuracy vs round and vs wire bytes (as in
:func:`fedq.report.plot_report`), bits over time per boundary and direction (mean with a min-max
band, from ``bits.jsonl``), and the histogram of the final per-channel bits (docs/algorithms.md
§1.4: where the regularizer left the bits is the learned importance). matplotlib is imported lazily
and drawn through the Agg canvas, like the federated report.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedq.report import cumulative_wire_bytes


def _step_rows(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_split_report(
    records: Sequence[Mapping[str, Any]],
    bit_maps: Mapping[str, Sequence[int]],
    path: str | Path,
    *,
    steps_path: Path | None = None,
) -> Path:
    """Draw the 2x2 split report to ``path``; works with no records (empty panels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(12, 8))
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2).ravel()
    acc = [(r["round"], r["accuracy"]) for r in records if r.get("accuracy") is not None]
    ax[0].plot([a for a, _ in acc], [b for _, b in acc], marker="o", ms=3)
    ax[0].set(title="(a) accuracy vs round", xlabel="round", ylabel="accuracy")
    wire = cumulative_wire_bytes(records)
    pts = [
        (w, r["accuracy"])
        for w, r in zip(wire, records, strict=True)
        if r.get("accuracy") is not None
    ]
    ax[1].plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3)
    ax[1].set(
        title="(b) accuracy vs wire bytes", xlabel="cumulative bytes (up + down)", ylabel="accuracy"
    )
    series: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
    for row in _step_rows(steps_path):
        for key, v in row.items():
            if key.startswith("bits/") and key.endswith("/mean"):
                name = key[len("bits/") : -len("/mean")]
                lo, hi = row.get(f"bits/{name}/min", v), row.get(f"bits/{name}/max", v)
                series[name].append((int(row["step"]), float(v), float(lo), float(hi)))
    for name, raw_pts in sorted(series.items()):
        by_step: dict[int, list[tuple[int, float, float, float]]] = defaultdict(list)
        for p in raw_pts:  # several clients report the same step: mean of means, min, max
            by_step[p[0]].append(p)
        pts4 = [
            (st, sum(p[1] for p in ps) / len(ps), min(p[2] for p in ps), max(p[3] for p in ps))
            for st, ps in sorted(by_step.items())
        ]
        xs = [p[0] for p in pts4]
        ax[2].plot(xs, [p[1] for p in pts4], label=name)
        ax[2].fill_between(xs, [p[2] for p in pts4], [p[3] for p in pts4], alpha=0.15)
    if not series:  # fixed / no compression: the bits actually sent per round
        rb = [(r["round"], r["mean_bits"]) for r in records if r.get("mean_bits") is not None]
        ax[2].plot([a for a, _ in rb], [b for _, b in rb], marker="o", ms=3, label="sent")
    ax[2].set(title="(c) bits over time (mean, min-max band)", xlabel="step", ylabel="bits")
    ax[2].legend(fontsize=7)
    for name, bits in sorted(bit_maps.items()):
        ax[3].hist(list(bits), bins=[b - 0.5 for b in range(1, 10)], alpha=0.5, label=name)
    ax[3].set(title="(d) final per-channel bits", xlabel="bits", ylabel="channels")
    if bit_maps:
        ax[3].legend(fontsize=7)
    for a in ax:
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    return out
