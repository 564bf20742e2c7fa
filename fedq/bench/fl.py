"""Federated compression policies on digits: accuracy vs wire bytes, same seed and rounds per arm.

Arms (docs/algorithms.md §2.5-2.6 for the paper's setting): fp32 (no compression), fixed 8-bit both
ways, cosine 32->8 + client-entropy scheduler (the paper's setting), and fedq's best policy. Wire
bytes are the serialized frames counted at the gRPC transport. A second part runs 100 logical
clients and reports seconds per round and the peak memory of the whole process tree (driver + Ray).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fedq.bench.machine import cpu_model, machine_info
from fedq.bench.memory import TreeMemorySampler

ROOT = Path(__file__).resolve().parents[2]

ARMS: dict[str, list[str]] = {
    "fp32": ["compression.uplink.policy=none", "compression.downlink.policy=none"],
    "fixed8": [
        "compression.uplink.policy=fixed",
        "compression.uplink.bits=8",
        "compression.downlink.policy=fixed",
        "compression.downlink.bits=8",
    ],
    "cosine32to8+client (paper)": [
        "compression.uplink.policy=client_entropy",
        "compression.uplink.b_min=8",
        "compression.uplink.b_max=32",
        "compression.uplink.granularity=tensor",
        "compression.uplink.symmetric=true",
        "compression.uplink.stochastic=true",
        "compression.downlink.policy=cosine",
        "compression.downlink.b_min=8",
        "compression.downlink.b_max=32",
        "compression.downlink.granularity=tensor",
        "compression.downlink.symmetric=true",
        "compression.downlink.stochastic=true",
    ],
    "fedq best: 2-bit EF up, 4-bit down": [
        "compression.uplink.policy=fixed",
        "compression.uplink.bits=2",
        "compression.uplink.error_feedback=true",
        "compression.uplink.granularity=group",
        "compression.uplink.group_size=256",
        "compression.downlink.policy=fixed",
        "compression.downlink.bits=4",
        "compression.downlink.granularity=group",
        "compression.downlink.group_size=256",
    ],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-scale", action="store_true", help="skip the 100-client run")
    p.add_argument("--scale-rounds", type=int, default=10)


def _base(args: argparse.Namespace) -> list[str]:
    return [
        "name=bench_fl",
        f"seed={args.seed}",
        "data.name=digits",
        "data.partition=dirichlet",
        "data.alpha=0.5",
        "rounds.num_clients=20",
        "rounds.clients_per_round=10",
        f"rounds.count={args.rounds}",
        "fed.strategy=fedavg",
        "model.name=mlp",
        "train.local_epochs=2",
        "train.batch_size=16",
        "train.lr=0.1",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fedq.config import load_scenario
    from fedq.runtime.simulate import simulate

    tmp = Path(tempfile.mkdtemp(prefix="fedq-bench-fl-"))
    scenario = ROOT / "scenarios" / "quickstart.yaml"
    rows = []
    for arm, sets in ARMS.items():
        cfg = load_scenario(scenario, _base(args) + sets)
        s = simulate(cfg, tmp / arm.split()[0].replace(":", ""))
        rows.append(
            {
                "arm": arm,
                "accuracy": s["final_accuracy"],
                "bytes": s["bytes_wire_total"],
                "bytes_up": s["bytes_up_total"],
                "bytes_down": s["bytes_down_total"],
                "seconds": round(s["wall_seconds"], 1),
            }
        )
    fp32 = rows[0]
    print(
        f"\nfedq bench fl: digits, Dirichlet 0.5, 20 clients (10/round), {args.rounds} rounds, "
        f"seed {args.seed} | {cpu_model()}, {os.cpu_count()} cores"
    )
    print(f"{'arm':38s} {'accuracy':>9s} {'wire bytes':>12s} {'vs fp32':>9s} {'acc delta':>9s}")
    for r in rows:
        r["reduction_vs_fp32"] = 1.0 - r["bytes"] / fp32["bytes"]
        r["accuracy_delta_points"] = 100.0 * (r["accuracy"] - fp32["accuracy"])
        print(
            f"{r['arm']:38s} {r['accuracy']:9.4f} {r['bytes']:12,d} "
            f"{-100 * r['reduction_vs_fp32']:8.1f}% {r['accuracy_delta_points']:+9.2f}"
        )
    result: dict[str, Any] = {
        "arms": rows,
        "rounds": args.rounds,
        "seed": args.seed,
        "machine": machine_info(),
    }
    best = rows[-1]
    result["goal_met"] = bool(
        best["reduction_vs_fp32"] >= 0.85 and best["accuracy_delta_points"] >= -1.0
    )
    print(
        f"goal (>= 85% fewer bytes at <= 1 point loss): {'PASS' if result['goal_met'] else 'FAIL'}"
    )
    if not args.skip_scale:
        result["scale_100_clients"] = _scale(args, tmp)
    return result


def _scale(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from fedq.config import load_scenario
    from fedq.runtime.simulate import simulate

    cfg = load_scenario(
        ROOT / "scenarios" / "digits_100_clients.yaml", [f"rounds.count={args.scale_rounds}"]
    )
    t0 = time.perf_counter()
    with TreeMemorySampler() as mem:
        s = simulate(cfg, tmp / "scale100")
    per_round = sorted(r["seconds"] for r in _records(tmp / "scale100"))
    out = {
        "clients": cfg.rounds.num_clients,
        "clients_per_round": cfg.rounds.clients_per_round,
        "rounds": cfg.rounds.count,
        "accuracy": s["final_accuracy"],
        "median_seconds_per_round": per_round[len(per_round) // 2],
        "wall_seconds_incl_startup": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(mem.peak_rss / 2**30, 2),
        "peak_pss_gib": round(mem.peak_pss / 2**30, 2),
    }
    out["memory_goal_met"] = out["peak_rss_gib"] <= 6.0
    print(
        f"\n100 clients ({cfg.rounds.clients_per_round}/round): "
        f"{out['median_seconds_per_round']:.2f} s/round (median), peak RSS "
        f"{out['peak_rss_gib']} GiB, PSS {out['peak_pss_gib']} GiB "
        f"(goal RSS <= 6 GiB: {'PASS' if out['memory_goal_met'] else 'FAIL'})"
    )
    return out


def _records(run_dir: Path) -> list[dict[str, Any]]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]
