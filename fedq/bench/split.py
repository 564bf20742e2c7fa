"""Split learning with AMAQ vs fixed-bit and fp32 cuts: MiniLM-L6 cut after block 3, LoRA, Rotten
Tomatoes (docs/algorithms.md §1.7-1.9). Same steps and seeds per arm, both directions coded, bits
and bytes as actually sent (frames counted at the gRPC transport). Time per step on an emulated
link = measured compute + bytes / bandwidth (+ latency), §1.9.

Arms: fp32; fixed 4/2/1-bit per channel (QAT, straight-through); AMAQ to an average of 4 (b_min =
2), 2 and 1.5 bits (b_min = 1); all-boundaries fixed 2-bit vs AMAQ-2; with ``--smollm2`` (or by
name in ``--arms``) SmolLM2-135M perplexity arms (fp32, fixed 4 and 3, AMAQ 4 and 3, floors as
above); by name only, the AQ-SGD baseline ``aqsgd4`` / ``aqsgd2`` (activations as each example's
change since its last visit, :mod:`fedq.adapt.aqsgd`; gradients fixed).
Each arm is a ``fedq simulate`` run (in-process hosts, real gRPC) with the split defaults (clipped
ranges, per-token row scales, stochastic gradient rounding).

``--link 100mbit`` also *measures* seconds per step between two network namespaces over a veth
shaped with ``tc tbf`` (fp32, fixed 4, AMAQ 4; :mod:`fedq.bench.netlink`, needs root).

``--set KEY=VALUE`` (repeatable) adds an override to every arm (e.g. ``split.quant_range=minmax``
or ``split.warmup_fraction=0.25``), ``--first-seed`` shifts the seeds (each seed draws its own
train/test subset; all arms of one seed share it).

Recorded runs and which goals pass: BENCHMARKS.md, "Split learning (`fedq bench split`)".
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

ARMS: dict[str, list[str]] = {
    "fp32": ["split.act_codec=none", "split.grad_codec=none"],
    "fixed4": ["split.act_codec=fixed", "split.grad_codec=fixed", "split.fixed_bits=4"],
    "fixed2": ["split.act_codec=fixed", "split.grad_codec=fixed", "split.fixed_bits=2"],
    "fixed1": ["split.act_codec=fixed", "split.grad_codec=fixed", "split.fixed_bits=1"],
    "amaq4": ["split.target_bits=4.0", "split.b_min=2"],  # floor 2 at a 4-bit target (BENCHMARKS)
    "amaq2": ["split.target_bits=2.0"],
    "amaq1.5": ["split.target_bits=1.5"],
    "all-b fixed2": [
        "split.all_boundaries=true",
        "split.act_codec=fixed",
        "split.grad_codec=fixed",
        "split.fixed_bits=2",
    ],
    "all-b amaq2": ["split.all_boundaries=true", "split.target_bits=2.0"],
    # AQ-SGD (optional baseline): activations as the change since the example's last visit
    "aqsgd4": ["split.act_codec=aqsgd", "split.grad_codec=fixed", "split.fixed_bits=4"],
    "aqsgd2": ["split.act_codec=aqsgd", "split.grad_codec=fixed", "split.fixed_bits=2"],
}
DEFAULT_ARMS = [a for a in ARMS if not a.startswith("aqsgd")]
SMOL_ARMS = {
    "smol fp32": ARMS["fp32"],
    "smol fixed4": ARMS["fixed4"],
    "smol fixed3": ["split.act_codec=fixed", "split.grad_codec=fixed", "split.fixed_bits=3"],
    "smol amaq4": ARMS["amaq4"],
    "smol amaq3": ["split.target_bits=3.0"],
}
ROOT = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=60, help="split steps per run")
    p.add_argument("--local-steps", type=int, default=20, help="steps per round (eval each)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run: first .. first+seeds-1")
    p.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help="comma-separated arm names (MiniLM or smol ...; aqsgd4 / aqsgd2 only by name)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra scenario override applied to every arm after the arm's own (repeatable), "
        "e.g. --set split.quant_range=minmax --set split.warmup_fraction=0.25",
    )
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--max-test", type=int, default=300)
    p.add_argument("--mbps", type=float, default=100.0, help="emulated link bandwidth")
    p.add_argument("--latency-ms", type=float, default=0.0, help="emulated one-way latency")
    p.add_argument("--smollm2", action="store_true", help="also run the SmolLM2 arms")
    p.add_argument(
        "--link",
        default=None,
        metavar="RATE",
        help="also time fp32 / fixed-4 / AMAQ-4 steps between two network namespaces "
        "over a veth shaped with tc to RATE (e.g. 100mbit); needs root",
    )
    p.add_argument("--link-steps", type=int, default=8, help="timed steps per link arm")
    p.add_argument("--link-batch", type=int, default=32, help="batch of the link arms")
    p.add_argument(
        "--frontier",
        choices=["minilm", "smollm2"],
        default=None,
        help="instead of --arms: the metric against the run's total cut bytes, fixed widths "
        "(--widths) and AMAQ under the bytes each --budgets width's fixed run sent (same seed)",
    )
    p.add_argument("--widths", default="1,1.5,2,3,4,8", help="fixed widths of the frontier")
    p.add_argument(
        "--budgets", default="1.5,2,3", help="frontier widths whose bytes the AMAQ arms get"
    )
    p.add_argument(
        "--amaq-arm",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="a frontier AMAQ variant with its own overrides (repeatable; default: one arm "
        "'amaq' with the scenario's AMAQ settings), e.g. 'short:split.warmup_fraction=0.1'",
    )
    p.add_argument("--jobs", type=int, default=1, help="frontier runs at once (processes)")
    p.add_argument("--out", default=None, help="frontier: folder for frontier.png / .json")


def _run(name: str, overrides: list[str], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from fedq.config import load_scenario
    from fedq.report import read_metrics
    from fedq.runtime.simulate import simulate

    smol = name.startswith("smol")
    scenario = "split_smollm2_amaq.yaml" if smol else "split_minilm_amaq.yaml"
    rounds = max(1, args.steps // args.local_steps)
    base = [
        f"seed={seed}",
        "rounds.num_clients=1",
        "rounds.clients_per_round=1",
        f"rounds.count={rounds}",
        f"split.local_steps={args.local_steps}",
        "split.b_min=1",
        "runtime.backend=inprocess",
        "runtime.workers=1",
        f"data.max_train={args.max_train}",
        f"data.max_test={args.max_test}",
    ]
    cfg = load_scenario(ROOT / "scenarios" / scenario, base + overrides + list(args.set))
    with tempfile.TemporaryDirectory(prefix="fedq-bench-split-") as out:
        summary = simulate(cfg, out)
        recs = read_metrics(Path(out))
    steps = rounds * args.local_steps
    wire = summary["bytes_wire_total"] - sum(r.get("state_bytes", 0) for r in recs)
    # the steps' messages both ways, as framed: each round's mean per step times its steps
    # (one client, so a round is local_steps steps)
    run_bytes = round(
        sum((r["step_bytes_up"] + r["step_bytes_down"]) for r in recs) * args.local_steps
    )
    step_bytes = sum(r["step_bytes_up"] + r["step_bytes_down"] for r in recs) / len(recs)
    compute = sum(r["seconds"] for r in recs) / steps
    link = step_bytes * 8 / (args.mbps * 1e6) + 2 * args.latency_ms / 1000
    last = recs[-1]
    return {
        "accuracy": last.get("accuracy"),
        "perplexity": last.get("perplexity"),
        "accuracy_rounds": [r.get("accuracy") for r in recs],
        "mean_bits_run": sum(r["mean_bits"] for r in recs) / len(recs),
        "mean_bits_final": last["mean_bits"],
        "step_bytes": step_bytes,
        "cut_bytes": wire,
        "run_bytes": run_bytes,
        "budget_spent": last.get("budget_spent"),
        "budget_level": last.get("budget_level"),
        "act_wire_bits_final": last.get("act_wire_bits"),
        "act_bits_range_final": [last.get("bits/cut/act/min"), last.get("bits/cut/act/max")],
        "s_per_step_compute": compute,
        "s_per_step_link": compute + link,
    }


def _fmt(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not xs:
        return "-"
    m = statistics.fmean(xs) * scale
    spread = (max(xs) - min(xs)) / 2 * scale
    return f"{m:.{digits}f}±{spread:.{digits}f}"


#: Link arms: AMAQ starts at its 4-bit target (no warm-up schedule) so the timed steps send 4 bits.
LINK_ARMS: dict[str, list[str]] = {
    "fp32": ARMS["fp32"],
    "fixed4": ARMS["fixed4"],
    "amaq4": ["split.target_bits=4.0", "split.init_bits=4.0", "split.b_min=1"],
}


def run_link(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per step between two network namespaces over a shaped veth (real gRPC, real
    link; :mod:`fedq.bench.netlink`). Goal (issue 5): the speed-up over fp32 reaches >= 80% of
    what the byte reduction allows, i.e. of ``t_fp32 / (t_fp32 - (B_fp32 - B_arm) / rate)``."""
    from fedq.bench.netlink import LinkUnavailable, rate_bits_per_s, run_link_arm, veth_link

    scenario = ROOT / "scenarios" / "split_minilm_amaq.yaml"
    base = [
        f"train.batch_size={args.link_batch}",
        "data.max_train=512",
        "data.max_test=8",
        "runtime.threads_per_worker=1",
    ]
    bps = rate_bits_per_s(args.link)
    res: dict[str, dict[str, Any]] = {}
    try:
        with veth_link(args.link) as link:
            for name, ov in LINK_ARMS.items():
                res[name] = run_link_arm(
                    link, scenario, [*base, *ov], steps=args.link_steps, warmup=2
                )
                print(f"  link {name}: {res[name]['s_per_step']:.3f} s/step", flush=True)
    except LinkUnavailable as e:
        print(f"link emulation skipped: {e}")
        return {"skipped": str(e)}
    f = res["fp32"]
    print(
        f"\nlink {args.link} between two network namespaces (MiniLM-L6 cut 3, batch "
        f"{args.link_batch}, len 64, 1 thread per side; median of {args.link_steps} steps)"
    )
    print(f"{'arm':<8} {'s/step':>8} {'KiB/step':>10} {'speed-up':>9} {'allowed':>8} {'share':>6}")
    for name, r in res.items():
        saved = (f["bytes_per_step"] - r["bytes_per_step"]) * 8 / bps
        allowed = f["s_per_step"] / max(f["s_per_step"] - saved, 1e-9)
        speed = f["s_per_step"] / r["s_per_step"]
        share = (speed - 1) / (allowed - 1) if allowed > 1 else float("nan")
        r.update(speedup=speed, allowed_speedup=allowed, share_of_allowed=share)
        print(
            f"{name:<8} {r['s_per_step']:>8.3f} {r['bytes_per_step'] / 1024:>10.1f} "
            f"{speed:>9.2f} {allowed:>8.2f} {share:>6.2f}"
        )
    return res


def _fixed(width: float) -> list[str]:
    return ["split.act_codec=fixed", "split.grad_codec=fixed", f"split.fixed_bits={width:g}"]


def _pool_map(jobs: list[tuple[str, list[str], int]], args: argparse.Namespace) -> list[Any]:
    """``_run`` over ``jobs`` (name, overrides, seed), ``args.jobs`` processes at once; results
    in the order of ``jobs`` whatever order they finish in."""
    if args.jobs <= 1:
        return [_run(n, ov, s, args) for n, ov, s in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_run, n, ov, s, args) for n, ov, s in jobs]
        return [f.result() for f in futures]


def _spread(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def run_frontier(args: argparse.Namespace) -> dict[str, Any]:
    """The byte frontier (issue: split learning under a byte budget). Every seed runs fp32, the
    fixed widths (fractional ones as a fixed per-channel mix) and, for each budget width, AMAQ
    with ``split.budget_bytes`` set to the bytes the fixed run at that width sent on the same
    seed. The paired difference AMAQ minus fixed is the result; the goal's test (a gap to fp32
    above twice the seed spread) is printed with it."""
    smol = args.frontier == "smollm2"
    pre = "smol " if smol else ""
    metric = "perplexity" if smol else "accuracy"
    widths = [float(w) for w in args.widths.split(",") if w]
    budgets = [float(w) for w in args.budgets.split(",") if w]
    missing = [w for w in budgets if w not in widths]
    if missing:
        raise SystemExit(f"--budgets {missing} must be among --widths {widths}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    first = [(pre + "fp32", ARMS["fp32"], s) for s in seeds]
    first += [(f"{pre}fixed {w:g}", _fixed(w), s) for s in seeds for w in widths]
    done = _pool_map(first, args)
    runs: dict[str, list[dict[str, Any]]] = {}
    for (name, _, _), r in zip(first, done, strict=True):
        runs.setdefault(name.removeprefix(pre), []).append(r)
    variants: dict[str, list[str]] = {}
    for spec in args.amaq_arm or ["amaq:"]:
        name, _, sets = spec.partition(":")
        variants["amaq" if name == "amaq" else f"amaq {name}"] = [x for x in sets.split(",") if x]
    second = []
    for w in budgets:
        for v, extra in variants.items():
            for i, s in enumerate(seeds):
                budget = runs[f"fixed {w:g}"][i]["run_bytes"]
                ov = [
                    "split.act_codec=amaq",
                    "split.grad_codec=amaq",
                    f"split.budget_bytes={budget}",
                ]
                second.append((f"{pre}{v} @{w:g}", ov + extra, s))
    for (name, _, _), r in zip(second, _pool_map(second, args), strict=True):
        runs.setdefault(name.removeprefix(pre), []).append(r)
    scale = 1.0 if smol else 100.0

    def vals(name: str) -> list[float]:
        return [r[metric] * scale for r in runs[name]]

    fp32 = statistics.fmean(vals("fp32"))
    print(
        f"\nsplit frontier ({args.frontier}): {args.steps} steps, seeds {seeds}; "
        f"{metric} against the run's cut bytes (both ways, as framed)"
    )
    print(f"{'arm':<12} {'MiB/run':>9} {'bits/run':>9} {metric:>16}  per seed")
    table: dict[str, Any] = {}
    for name in runs:
        got = vals(name)
        mib = statistics.fmean(r["run_bytes"] for r in runs[name]) / 2**20
        bits = statistics.fmean(r["mean_bits_run"] for r in runs[name])
        row = {"mib": mib, "bits_run": bits, "values": got, "mean": statistics.fmean(got)}
        row["spread"] = _spread(got)
        table[name] = row
        per = " / ".join(f"{x:.1f}" for x in got)
        print(
            f"{name:<12} {mib:>9.2f} {bits:>9.2f} {row['mean']:>10.2f}±{row['spread']:<5.2f}  {per}"
        )
    print("\nAMAQ against fixed bits at the same bytes (paired by seed):")
    goals = {}
    for w, v in ((w, v) for w in budgets for v in variants):
        arm = f"{v} @{w:g}"
        a, f = table[arm], table[f"fixed {w:g}"]
        over = [100 * (r["budget_spent"] - r["run_bytes"]) / r["run_bytes"] for r in runs[arm]]
        byte_err = [
            100 * (ra["run_bytes"] - rf["run_bytes"]) / rf["run_bytes"]
            for ra, rf in zip(runs[arm], runs[f"fixed {w:g}"], strict=True)
        ]
        base = table["fp32"]["values"]
        if smol:  # lower is better: the gain in percent of the fixed arm's perplexity
            diff = [100 * (y - x) / y for x, y in zip(a["values"], f["values"], strict=True)]
            gaps = [100 * (y - x) / x for x, y in zip(base, f["values"], strict=True)]
            need = 3.0
        else:
            diff = [x - y for x, y in zip(a["values"], f["values"], strict=True)]
            gaps = [x - y for x, y in zip(base, f["values"], strict=True)]
            need = 1.0
        # the gap is paired by seed like the result: its spread is the seed-to-seed spread
        gap, spread = statistics.fmean(gaps), _spread(gaps)
        mean = statistics.fmean(diff)
        judged = gap > 2 * spread
        goals[arm] = {
            "diff": diff,
            "mean_diff": mean,
            "gap_to_fp32": gap,
            "gap_per_seed": gaps,
            "seed_spread": spread,
            "judged": judged,
            "met": judged and mean >= need,
            "bytes_vs_fixed_pct": byte_err,
            "ledger_vs_transport_pct": over,
        }
        unit = "% ppl" if smol else " points"
        print(
            f"  {arm}: AMAQ - fixed {mean:+.2f}{unit} (per seed "
            f"{' '.join(f'{d:+.1f}' for d in diff)}); bytes vs fixed "
            f"{' '.join(f'{e:+.2f}%' for e in byte_err)}; frontier gap to fp32 {gap:.2f}, "
            f"2x seed spread {2 * spread:.2f}: "
            + ("judged" if judged else "gap within the noise, not judged")
            + (f", goal (>= {need:g}) {'met' if mean >= need else 'not met'}" if judged else "")
        )
    from fedq.bench.machine import machine_info

    out = {"args": vars(args) | {"func": None}, "machine": machine_info()}
    out |= {"arms": table, "goals": goals, "runs": runs}
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        _plot_frontier(table, fp32, metric, folder / "frontier.png", args)
        import json

        (folder / "frontier.json").write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {folder / 'frontier.png'} and frontier.json")
    return out


def _plot_frontier(
    table: dict[str, Any], fp32: float, metric: str, path: Path, args: argparse.Namespace
) -> None:
    """Metric against MiB per run: the fixed frontier (line, seed spread as error bars), AMAQ
    at the budgets (points), fp32 (dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series: dict[str, list[tuple[float, float, float, str]]] = {}
    for n, r in table.items():  # "fixed 2" -> fixed; "amaq short @2" -> amaq short
        if n != "fp32":
            kind, _, at = n.rpartition(" @") if " @" in n else ("fixed", "", n.split(" ")[1])
            series.setdefault(kind, []).append((r["mib"], r["mean"], r["spread"], at))
    for i, (kind, rows) in enumerate(series.items()):
        style = "o-" if kind == "fixed" else "sDv^<>"[i % 6]
        x, y, e, names = zip(*sorted(rows), strict=True)
        ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=kind)
        if kind == "fixed":
            for xi, yi, n in zip(x, y, names, strict=True):
                ax.annotate(
                    n,
                    (xi, yi),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.axhline(fp32, linestyle="--", color="grey", label="fp32")
    ax.set_xscale("log")
    ax.set_xlabel("cut bytes per run (MiB, both ways)")
    ax.set_ylabel(metric + (" (%)" if metric == "accuracy" else ""))
    ax.set_title(f"split {args.frontier}: {args.steps} steps, {args.seeds} seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.frontier:
        return run_frontier(args)
    known = ARMS | SMOL_ARMS
    unknown = [a for a in args.arms.split(",") if a and a not in known]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {', '.join(known)}")
    arms = {a: known[a] for a in args.arms.split(",") if a}
    if args.smollm2:
        arms.update(SMOL_ARMS)
    results: dict[str, list[dict[str, Any]]] = {}
    for name, ov in arms.items():
        results[name] = [
            _run(name, ov, s, args) for s in range(args.first_seed, args.first_seed + args.seeds)
        ]
        curves = [r["accuracy_rounds"] for r in results[name]]
        print(
            f"  done {name}: acc {[r['accuracy'] for r in results[name]]}, per round {curves}",
            flush=True,
        )
    print(f"\nsplit bench: {args.steps} steps x {args.seeds} seeds, link {args.mbps} Mbit/s")
    head = f"{'arm':<14} {'acc %':>12} {'ppl':>10} {'bits(run)':>10} {'bits(end)':>10} "
    print(head + f"{'act wire(end)':>14} {'KiB/step':>10} {'s/step':>8} {'s/step@link':>12}")
    table = {}
    for name, rs in results.items():
        acc = [r["accuracy"] for r in rs if r["accuracy"] is not None]
        ppl = [r["perplexity"] for r in rs if r["perplexity"] is not None]
        row: dict[str, Any] = {
            k: statistics.fmean(r[k] for r in rs)
            for k in (
                "mean_bits_run",
                "mean_bits_final",
                "step_bytes",
                "s_per_step_compute",
                "s_per_step_link",
            )
        }
        wire = [r["act_wire_bits_final"] for r in rs if r.get("act_wire_bits_final") is not None]
        row["act_wire_bits_final"] = statistics.fmean(wire) if wire else float("nan")
        row["accuracy"] = acc
        table[name] = row
        print(
            f"{name:<14} {_fmt(acc, 100, 1):>12} {_fmt(ppl, 1, 1):>10} "
            f"{row['mean_bits_run']:>10.2f} {row['mean_bits_final']:>10.2f} "
            f"{row['act_wire_bits_final']:>14.2f} {row['step_bytes'] / 1024:>10.1f} "
            f"{row['s_per_step_compute']:>8.2f} "
            f"{row['s_per_step_link']:>12.2f}"
        )
    out = {"args": vars(args) | {"func": None}, "arms": table, "runs": results}
    if args.link:
        out["link"] = run_link(args)
    return out
