"""A site's memory and speed with a packed frozen base (``model.base_bits``) against the fp32 base.

One site fine-tunes the causal LM (SmolLM2-135M-Instruct, or ``--model hf:PATH``) with LoRA on the
shipped instruction-tuning scenario's data and settings, the same steps in every arm, each arm
and seed in a fresh process (``--arms``): the base in fp32, its frozen linear layers packed at
8, 4, 3 or 2 bits (``N-bit``), or within a budget of X bits per weight (``X-avg``,
``model.base_budget_mb``); ``/gc`` adds gradient checkpointing, ``/lq`` starts LoRA from what
packing loses (``model.base_lowrank_init``). Per arm and seed: the peak resident memory of the
site process (the kernel's high-water mark, ``VmHWM``) while loading the model and while training
it (the held-out evaluations, the server's work in a run, are left out), that peak above the
process after its imports and data, the bytes of the base's linear weights as held, seconds per
training step, and held-out perplexity before and after the fine-tuning. Seeds are paired: a seed
gives every arm the same data, holdout and LoRA initialisation. The table gives each arm's mean
against the fp32 arm, and the seed-to-seed spread (standard deviation) of the fp32 arm's final
perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedq.bench.machine import cpu_model, machine_info

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "smollm2_instruct_lora.yaml"
#: fixed widths: arm name -> model.base_bits (None: the fp32 base)
WIDTHS: dict[str, int | None] = {"fp32": None, "8-bit": 8, "4-bit": 4, "3-bit": 3, "2-bit": 2}
#: A budget arm is ``X-avg``: model.base_budget_mb set to X bits for each weight of the packed
#: linear layers (scales and widths included), e.g. ``2.75-avg``.
BUDGET_SUFFIX = "-avg"


def arm_settings(arm: str) -> tuple[int | None, float | None, bool, bool]:
    """``(model.base_bits, average bits of a budget, model.gradient_checkpointing,
    model.base_lowrank_init)`` of an arm: ``fp32``, ``N-bit`` or ``X-avg``, then any of ``/gc``
    (gradient checkpointing) and ``/lq`` (LoRA started from the packing residual)."""
    width, *flags = arm.split("/")
    if not set(flags) <= {"gc", "lq"} or len(set(flags)) < len(flags):
        raise ValueError(arm)
    gc, lq = "gc" in flags, "lq" in flags
    if width in WIDTHS and not (lq and WIDTHS[width] is None):
        return WIDTHS[width], None, gc, lq
    if width.endswith(BUDGET_SUFFIX):
        avg = float(width.removesuffix(BUDGET_SUFFIX))
        if 2 <= avg <= 9:
            return None, avg, gc, lq
    raise ValueError(arm)


def _arm(text: str) -> str:
    try:
        arm_settings(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an arm is fp32, N-bit (N in 8, 4, 3, 2) or X-avg (X bits per weight, "
            "2 to 9), optionally with /gc and (packed) /lq"
        ) from None
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2_instruct", help="model.name (hf:PATH works)")
    p.add_argument(
        "--arms",
        nargs="+",
        default=["fp32", "fp32/gc", "8-bit", "4-bit", "4-bit/gc", "3-bit", "2.75-avg/gc"],
        type=_arm,
        metavar="ARM",
        help="fp32, N-bit (N in 8, 4, 3, 2), or X-avg (a budget of X bits per weight, scales "
        "included); /gc: with gradient checkpointing; /lq: LoRA started from what packing "
        "loses (every arm against fp32)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num-samples", type=int, default=240, help="instruction records in all")
    p.add_argument("--epochs", type=int, default=1, help="passes over the site's training data")
    p.add_argument("--group-size", type=int, default=64, help="model.base_group_size")


def _status_mib() -> dict[str, float]:
    """``VmHWM`` (peak resident since the last :func:`_reset_peak`), ``VmRSS`` and
    ``RssAnon`` of this process, in MiB."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _reset_peak() -> None:
    """Start the kernel's peak-resident count afresh (Linux: ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def site(
    model: str,
    bits: int | None,
    seed: int,
    num_samples: int,
    epochs: int,
    group_size: int,
    avg_bits: float | None = None,
    checkpointing: bool = False,
    lowrank: bool = False,
) -> dict[str, Any]:
    """One site's fine-tuning in this process (a fresh one: its peak memory is the arm's). The
    site's peak is the larger of two phases: loading the model, and training it; the held-out
    evaluations before and after (the server's work in a run) are left out of it."""
    import torch

    from fedq.config import load_scenario
    from fedq.fed.train import lm_evaluation, local_train
    from fedq.models import hf
    from fedq.models.hf import model_config
    from fedq.models.lowbit import PackedLinear, kept, packable_params
    from fedq.models.registry import model_entry
    from fedq.modes.federated import build_bundle
    from fedq.runtime.setup import load_data

    torch.set_num_threads(os.cpu_count() or 1)
    overrides = [
        f"seed={seed}",
        f"model.name={model}",
        f"data.num_samples={num_samples}",
        f"train.local_epochs={epochs}",
        f"model.base_group_size={group_size}",
        "model.sample_prompts=[]",
        f"model.gradient_checkpointing={str(checkpointing).lower()}",
        f"model.base_lowrank_init={str(lowrank).lower()}",
    ]
    if bits is not None:
        overrides.append(f"model.base_bits={bits}")
    if avg_bits is not None:
        entry = model_entry(model)
        assert entry is not None and entry.base is not None
        budget = avg_bits * packable_params(model_config(entry.base())) / 8 / 2**20
        overrides.append(f"model.base_budget_mb={budget}")
    cfg = load_scenario(SCENARIO, overrides)
    split = load_data(cfg)
    hf.import_libraries()  # what every arm loads, so "imports" means the same in all
    imports = _status_mib()["VmRSS"]  # torch, transformers, PEFT, fedq, the data; no model yet
    _reset_peak()
    t0 = time.perf_counter()
    bundle = build_bundle(cfg, 1, 0)
    load_s = time.perf_counter() - t0
    load_peak = _status_mib()["VmHWM"]
    # the frozen linear weights that a packed base packs (the kept LM head aside), as held
    packed = [m for m in bundle.module.modules() if isinstance(m, PackedLinear)]
    held = sum(m.packed_nbytes() for m in packed) + sum(
        m.weight.numel() * m.weight.element_size()
        for n, m in bundle.module.named_modules()
        if type(m) is torch.nn.Linear and not m.weight.requires_grad and not kept(n)
    )
    before = lm_evaluation(bundle, split.test)["perplexity"]
    generator = torch.Generator().manual_seed(seed)
    idx = torch.arange(len(split.train))
    _reset_peak()
    t0 = time.perf_counter()
    loss, steps = local_train(bundle, split.train, idx, cfg.train, generator=generator)
    train_s = time.perf_counter() - t0
    train_peak = _status_mib()["VmHWM"]
    after = lm_evaluation(bundle, split.test)["perplexity"]
    peak = max(load_peak, train_peak)
    return {
        "bits": bits,
        "avg_bits_budget": avg_bits,
        "gradient_checkpointing": checkpointing,
        "base_lowrank_init": lowrank,
        "seed": seed,
        "perplexity_before": before,
        "perplexity_after": after,
        "train_loss": loss,
        "steps": steps,
        "seconds_per_step": train_s / max(steps, 1),
        "load_seconds": load_s,
        "base_linear_mib": held / 2**20,
        "packed_layers": len(packed),
        "load_peak_mib": load_peak,
        "train_peak_mib": train_peak,
        "peak_rss_mib": peak,
        "peak_above_imports_mib": peak - imports,
        "rss_after_imports_mib": imports,
    }


def _child(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    bits, avg_bits, checkpointing, lowrank = arm_settings(arm)
    spec = {
        "model": args.model,
        "bits": bits,
        "avg_bits": avg_bits,
        "checkpointing": checkpointing,
        "lowrank": lowrank,
        "seed": seed,
        "num_samples": args.num_samples,
        "epochs": args.epochs,
        "group_size": args.group_size,
    }
    done = subprocess.run(
        [sys.executable, "-m", "fedq.bench.base", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench base: arm {arm} seed {seed} failed:\n{done.stderr[-3000:]}")
    return {"arm": arm, **json.loads(done.stdout.strip().splitlines()[-1])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for arm in args.arms:
            row = _child(arm, seed, args)
            rows.append(row)
            print(
                f"  seed {seed} {arm:11s}: perplexity {row['perplexity_before']:.3f} -> "
                f"{row['perplexity_after']:.3f}, {row['seconds_per_step']:.2f} s/step, peak RSS "
                f"{row['peak_rss_mib']:,.0f} MiB (load {row['load_peak_mib']:,.0f}, train "
                f"{row['train_peak_mib']:,.0f}; {row['peak_above_imports_mib']:,.0f} above "
                f"imports), base linear weights {row['base_linear_mib']:,.1f} MiB",
                flush=True,
            )
    return _table(args, rows)


def _table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    print(
        f"\nfedq bench base: {args.model}, instructions ({args.num_samples} records), one site, "
        f"{args.epochs} epoch(s), seeds {args.seeds} | {cpu_model()}, {os.cpu_count()} cores; "
        "/gc: gradient checkpointing"
    )
    print(
        f"{'arm':11s} {'weights MiB':>11s} {'peak MiB':>9s} {'x fp32':>7s} {'above imp.':>10s} "
        f"{'x fp32':>7s} {'s/step':>7s} {'x fp32':>7s} {'ppl after':>9s} {'vs fp32':>8s}"
    )
    by_arm = {a: [r for r in rows if r["arm"] == a] for a in args.arms}
    ref = by_arm.get("fp32", [])
    summary: dict[str, Any] = {}

    def paired(rs: list[dict[str, Any]], key: str) -> float | None:
        if not ref:
            return None
        pairs = [r[key] / f[key] for r in rs for f in ref if f["seed"] == r["seed"]]
        return statistics.mean(pairs) if pairs else None

    for arm, rs in by_arm.items():
        s = {
            key: statistics.mean(r[key] for r in rs)
            for key in (
                "base_linear_mib",
                "peak_rss_mib",
                "peak_above_imports_mib",
                "seconds_per_step",
                "perplexity_before",
                "perplexity_after",
            )
        }
        s["peak_vs_fp32"] = paired(rs, "peak_rss_mib")
        s["peak_above_imports_vs_fp32"] = paired(rs, "peak_above_imports_mib")
        s["seconds_per_step_vs_fp32"] = paired(rs, "seconds_per_step")
        ppl = paired(rs, "perplexity_after")
        s["perplexity_vs_fp32"] = None if ppl is None else ppl - 1.0
        summary[arm] = s

        def x(v: float | None) -> str:
            return "" if v is None else f"{v:6.2f}x"

        rel = s["perplexity_vs_fp32"]
        print(
            f"{arm:11s} {s['base_linear_mib']:11.1f} {s['peak_rss_mib']:9,.0f} "
            f"{x(s['peak_vs_fp32']):>7s} {s['peak_above_imports_mib']:10,.0f} "
            f"{x(s['peak_above_imports_vs_fp32']):>7s} {s['seconds_per_step']:7.2f} "
            f"{x(s['seconds_per_step_vs_fp32']):>7s} {s['perplexity_after']:9.3f} "
            f"{'' if rel is None else f'{100 * rel:+7.2f}%':>8s}"
        )
    result: dict[str, Any] = {"rows": rows, "arms": summary, "machine": machine_info()}
    if ref:
        spread = statistics.stdev([f["perplexity_after"] for f in ref]) if len(ref) > 1 else 0.0
        result["fp32_seed_spread"] = spread
        print(
            f"seed-to-seed spread (std of fp32's final perplexity over {len(ref)} seeds): "
            f"{spread:.3f}"
        )
        for arm in ("4-bit", "4-bit/gc"):
            four = summary.get(arm)
            if four is None:
                continue
            met = four["peak_vs_fp32"] <= 0.35 and four["perplexity_vs_fp32"] <= 0.03
            result[f"goal_{arm.replace('-', '_').replace('/', '_')}_met"] = bool(met)
            print(
                f"goal ({arm}: peak memory <= 0.35x of fp32's, perplexity within 3%): "
                f"{'PASS' if met else 'FAIL'}"
            )
    return result


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(site(**spec)))
