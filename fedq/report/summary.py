"""One run's headline numbers, computed from its metrics records (``summary.json``).

Conventions (shared with :func:`fedq.report.plot_report`): ``bytes_up``, ``bytes_down`` and
``bytes_fp32`` are per-record increments (bytes that crossed the transport for that record, and
the fp32 equivalent), so totals are sums; ``epsilon`` is the privacy spent so far, so the run's
value is the last one reported. Missing or null fields count as absent, never as zero accuracy.
A round counts as applied unless a record of it says ``applied: false`` (it was discarded: too
few updates arrived, and the model stayed as it was).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SUMMARY_KEYS = (
    "final_accuracy",
    "best_accuracy",
    "bytes_up_total",
    "bytes_down_total",
    "bytes_wire_total",
    "bytes_fp32_total",
    "compression_ratio",
    "epsilon_spent",
    "rounds_completed",
    "rounds_applied",
    "rounds_discarded",
    "wall_seconds",
)


def values(records: Iterable[Mapping[str, Any]], key: str) -> list[float]:
    """Non-null values of ``key``, in record order."""
    return [float(r[key]) for r in records if r.get(key) is not None]


def summarize(
    records: Sequence[Mapping[str, Any]],
    *,
    wall_seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Final / best accuracy, wire and fp32 byte totals, compression ratio (fp32 / wire), ε spent,
    rounds completed (distinct ``round`` values), of which applied and discarded, and wall
    seconds, plus ``extra`` (which may not redefine those keys). Absent quantities are ``None``.
    """
    acc = values(records, "accuracy")
    eps = values(records, "epsilon")
    up = int(sum(values(records, "bytes_up")))
    down = int(sum(values(records, "bytes_down")))
    fp32 = int(sum(values(records, "bytes_fp32")))
    wire = up + down
    rounds = {r["round"] for r in records if r.get("round") is not None}
    discarded = {
        r["round"] for r in records if r.get("round") is not None and r.get("applied") is False
    }
    summary: dict[str, Any] = {
        "final_accuracy": acc[-1] if acc else None,
        "best_accuracy": max(acc) if acc else None,
        "bytes_up_total": up,
        "bytes_down_total": down,
        "bytes_wire_total": wire,
        "bytes_fp32_total": fp32,
        "compression_ratio": fp32 / wire if wire > 0 and fp32 > 0 else None,
        "epsilon_spent": eps[-1] if eps else None,
        "rounds_completed": len(rounds),
        "rounds_applied": len(rounds - discarded),
        "rounds_discarded": len(discarded),
        "wall_seconds": float(wall_seconds),
    }
    ppl = values(records, "perplexity")
    if ppl:  # a causal LM: held-out perplexity instead of accuracy
        summary["final_perplexity"] = ppl[-1]
        summary["best_perplexity"] = min(ppl)
    for key in ("site_accuracy", "site_perplexity"):  # data.site_holdout: the sites' own rows
        seen = values(records, key)
        if seen:
            summary[f"last_{key}"] = seen[-1]
    clash = sorted(set(extra or {}) & set(summary))
    if clash:
        raise ValueError(f"extra summary keys would overwrite computed ones: {clash}")
    summary.update(extra or {})
    return summary
