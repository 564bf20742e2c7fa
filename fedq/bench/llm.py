"""Federated LoRA instruction tuning of a causal LM: held-out perplexity against adapter bits.

SmolLM2-135M-Instruct (the packaged model, or ``--model hf:PATH``) on the generated
``instructions`` data, 4 clients (one per worker process, or fewer with ``--workers``), every
client every round. Arms: the adapter traffic both ways at fp32 (no compression), at fixed 8, 4
and 2 bits (one scale per row), and at 4 bits with one scale per group of 256 values; and the
same data in split mode (cut after block 3, or ``--cut``; the steps of a federated local epoch
per client per round) with the cut at fp32, fixed 4 bits, or AMAQ towards 4 bits. Per arm and
seed: the base model's held-out perplexity (before any round), the final one, wire bytes per round,
median seconds per round, and the peak RSS of one client process. Seeds are paired (the same seed
gives every arm the same data, holdout and LoRA initialisation); the table reports each arm's mean
over seeds, against the fp32 arm of its mode, and the seed-to-seed spread (standard deviation) of
the fp32 arm's final perplexity.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fedq.bench.machine import cpu_model, machine_info
from fedq.bench.memory import TreeMemorySampler

ROOT = Path(__file__).resolve().parents[2]
ARMS: dict[str, list[str]] = {
    "fp32": ["compression.uplink.policy=none", "compression.downlink.policy=none"],
    **{
        f"{b}-bit": [
            "compression.uplink.policy=fixed",
            f"compression.uplink.bits={b}",
            "compression.downlink.policy=fixed",
            f"compression.downlink.bits={b}",
        ]
        for b in (8, 4, 2)
    },
    # one scale per 256 values instead of one per row: LoRA's B matrices have rows of r values
    "4-bit/g256": [
        f"compression.{link}.{key}"
        for link in ("uplink", "downlink")
        for key in ("policy=fixed", "bits=4", "granularity=group", "group_size=256")
    ],
    # split mode on the same data: the client holds blocks [0, 3), the server the rest; each
    # client takes SPLIT_STEPS steps per round (the steps of its federated local epoch)
    "split-fp32": ["split.act_codec=none", "split.grad_codec=none"],
    "split-4-bit": ["split.act_codec=fixed", "split.grad_codec=fixed", "split.fixed_bits=4"],
    "split-amaq": ["split.act_codec=amaq", "split.grad_codec=amaq", "split.target_bits=4"],
}
SPLIT_STEPS = 7


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2_instruct", help="model.name (hf:PATH works)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num-samples", type=int, default=240, help="instruction records in all")
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="worker processes for the 4 clients (runtime.workers)",
    )
    p.add_argument("--cut", type=int, default=3, help="split arms: split.cut (client blocks)")
    p.add_argument(
        "--arms", nargs="+", default=["fp32", "8-bit", "4-bit", "2-bit"], choices=list(ARMS)
    )


def _overrides(args: argparse.Namespace, seed: int) -> list[str]:
    return [
        "name=bench_llm",
        f"seed={seed}",
        f"model.name={args.model}",
        f"data.num_samples={args.num_samples}",
        f"rounds.count={args.rounds}",
        "rounds.num_clients=4",
        "rounds.clients_per_round=4",
        f"runtime.workers={args.workers}",
        "model.sample_prompts=[]",
    ]


def scenario_for(arm: str, tmp: Path, cut: int = 3) -> Path:
    """The scenario an arm runs: the shipped one, or (``split-*``) the same run in split mode
    (no ``compression:`` section; the cut and its steps set)."""
    import yaml

    scenario = ROOT / "scenarios" / "smollm2_instruct_lora.yaml"
    if not arm.startswith("split"):
        return scenario
    raw = yaml.safe_load(scenario.read_text())
    raw.pop("compression", None)
    raw["mode"] = "split"
    raw["split"] = {"cut": cut, "local_steps": SPLIT_STEPS}
    out = tmp / "split_scenario.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def base_perplexity(cfg: Any) -> float:
    """The held-out perplexity of the model before any round (LoRA's B starts at zero, so this
    is the base model's), on the evaluation split the run uses."""
    from fedq.fed.train import evaluation
    from fedq.modes.federated import build_bundle
    from fedq.runtime.setup import load_data

    split = load_data(cfg)
    bundle = build_bundle(cfg, 1, 0)
    return float(evaluation(bundle, split.test)["perplexity"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fedq.config import load_scenario
    from fedq.runtime.simulate import simulate

    tmp = Path(tempfile.mkdtemp(prefix="fedq-bench-llm-"))
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        base_cfg = load_scenario(scenario_for("fp32", tmp), _overrides(args, seed))
        before = base_perplexity(base_cfg)
        for arm in args.arms:
            cfg = load_scenario(
                scenario_for(arm, tmp, args.cut), _overrides(args, seed) + ARMS[arm]
            )
            out = tmp / f"{arm}-seed{seed}"
            with TreeMemorySampler() as mem:
                s = simulate(cfg, out)
            records = _records(out)
            seconds = sorted(r["seconds"] for r in records)
            clients = [v for k, v in mem.peak_by_process.items() if "WorkerHost" in k]
            row = {
                "arm": arm,
                "seed": seed,
                "perplexity_before": before,
                "perplexity_after": s.get("final_perplexity"),
                "bytes_per_round": s["bytes_wire_total"] / max(len(records), 1),
                "bytes_up_per_round": s["bytes_up_total"] / max(len(records), 1),
                "median_seconds_per_round": seconds[len(seconds) // 2],
                "peak_rss_client_gib": round(max(clients, default=0) / 2**30, 2),
                "peak_rss_tree_gib": round(mem.peak_rss / 2**30, 2),
            }
            rows.append(row)
            print(
                f"  seed {seed} {arm:11s}: perplexity {before:.3f} -> "
                f"{row['perplexity_after']:.3f}, {row['bytes_per_round']:,.0f} B/round, "
                f"{row['median_seconds_per_round']:.1f} s/round, client peak RSS "
                f"{row['peak_rss_client_gib']} GiB",
                flush=True,
            )
    return _table(args, rows)


def _table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    print(
        f"\nfedq bench llm: {args.model}, instructions ({args.num_samples} records), 4 clients "
        f"on {args.workers} workers, "
        f"{args.rounds} rounds, seeds {args.seeds} | {cpu_model()}, {os.cpu_count()} cores"
    )
    print(
        f"{'arm':11s} {'ppl before':>10s} {'ppl after':>10s} {'vs fp32':>8s} {'B/round':>12s} "
        f"{'fewer B':>8s} {'s/round':>8s} {'client GiB':>10s}"
    )
    by_arm = {a: [r for r in rows if r["arm"] == a] for a in args.arms}
    fp32 = by_arm.get("fp32", [])
    summary: dict[str, Any] = {}
    for arm, rs in by_arm.items():
        # each mode against its own fp32 arm (split's bytes are activations and gradients)
        ref = by_arm.get("split-fp32", []) if arm.startswith("split") else fp32
        after = statistics.mean(r["perplexity_after"] for r in rs)
        before = statistics.mean(r["perplexity_before"] for r in rs)
        size = statistics.mean(r["bytes_per_round"] for r in rs)
        rel = ref_bytes = None
        if ref:
            # paired by seed: this arm's final perplexity over fp32's, per seed, then the mean
            pairs = [
                (r["perplexity_after"] / f["perplexity_after"])
                for r in rs
                for f in ref
                if f["seed"] == r["seed"]
            ]
            rel = statistics.mean(pairs) - 1.0
            ref_bytes = statistics.mean(f["bytes_per_round"] for f in ref) / size
        summary[arm] = {
            "perplexity_before": before,
            "perplexity_after": after,
            "perplexity_vs_fp32": rel,
            "bytes_per_round": size,
            "fewer_bytes_than_fp32": ref_bytes,
            "median_seconds_per_round": statistics.median(
                r["median_seconds_per_round"] for r in rs
            ),
            "peak_rss_client_gib": max(r["peak_rss_client_gib"] for r in rs),
        }
        print(
            f"{arm:11s} {before:10.3f} {after:10.3f} "
            f"{'' if rel is None else f'{100 * rel:+7.2f}%':>8s} {size:12,.0f} "
            f"{'' if ref_bytes is None else f'{ref_bytes:7.2f}x':>8s} "
            f"{summary[arm]['median_seconds_per_round']:8.1f} "
            f"{summary[arm]['peak_rss_client_gib']:10.2f}"
        )
    result: dict[str, Any] = {"rows": rows, "arms": summary, "machine": machine_info()}
    if fp32:
        gain, spread = _gain_and_spread(result, "fp32", fp32)
        four = summary.get("4-bit/g256") or summary.get("4-bit")
        if four and four["perplexity_vs_fp32"] is not None:
            met = four["perplexity_vs_fp32"] <= 0.02 and (four["fewer_bytes_than_fp32"] or 0) >= 8
            result["goal_4bit_met"] = bool(met)
            print(
                "goal (4-bit within 2% of fp32 perplexity at >= 8x fewer bytes): "
                f"{'PASS' if met else 'FAIL'}"
            )
        if len(fp32) > 1:
            result["goal_gain_met"] = bool(gain > 2 * spread)
    if by_arm.get("split-fp32"):  # the same figures for split mode's own fp32 arm
        _gain_and_spread(result, "split-fp32", by_arm["split-fp32"])
    return result


def _gain_and_spread(
    result: dict[str, Any], arm: str, rows: list[dict[str, Any]]
) -> tuple[float, float]:
    """``arm``'s mean perplexity gain over the base and the seed-to-seed spread (std of its final
    perplexity; 0 with one seed), printed and put into ``result`` as ``<arm>_gain`` and
    ``<arm>_seed_spread`` (``-`` as ``_``)."""
    gain = statistics.mean(f["perplexity_before"] - f["perplexity_after"] for f in rows)
    spread = statistics.stdev([f["perplexity_after"] for f in rows]) if len(rows) > 1 else 0.0
    key = arm.replace("-", "_")
    result[f"{key}_gain"], result[f"{key}_seed_spread"] = gain, spread
    print(
        f"perplexity gain over the base ({arm}): {gain:.3f}; seed-to-seed spread (std of final "
        f"perplexity over {len(rows)} seeds): {spread:.3f}"
    )
    return gain, spread


def _records(run_dir: Path) -> list[dict[str, Any]]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]
