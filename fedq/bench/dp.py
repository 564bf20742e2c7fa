"""DP-SGD cost on the LoRA MiniLM classifier: step time and peak memory vs a non-private step.

Modes: ``nonprivate`` (plain SGD step), ``hooks`` (Opacus per-sample gradients via hooks) and
``ghost`` (Opacus ghost clipping, Li et al. 2022, arXiv:2110.05679). Same model
(``minilm_lora``, LoRA r=8 on query/value + head), same fixed batch (32 Rotten Tomatoes texts padded
to 64 tokens), same optimizer. Goal: a DP step costs <= 1.5x the time and <= 1.2x the memory of a
non-private step.

Each mode runs in a fresh Python process, so one mode's allocations cannot inflate another's peak.
Time is the median of ``--steps`` steps after ``--warmup`` steps. Memory on CPU: after the model
and batch are loaded the process resets its peak-RSS mark (Linux ``/proc/self/clear_refs``), then
reports ``VmHWM - VmRSS_at_reset`` (the training peak above the loaded model) and the whole-process
peak ``VmHWM``; on CUDA, ``torch.cuda.max_memory_allocated`` the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any

from fedq.bench.machine import cpu_model

MODES = ("nonprivate", "hooks", "ghost")
TIME_GOAL = 1.5
MEMORY_GOAL = 1.2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=5, help="measured steps per mode (median kept)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of modes")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One mode in this (fresh) process; returns its timings and memory (see module doc)."""
    import resource

    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from fedq.data import TextDataset, load_dataset
    from fedq.models import LoraTextBundle, build_model, encoders
    from fedq.privacy import make_private

    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    mode, bs, seq = cfg["mode"], cfg["batch_size"], cfg["seq_len"]
    bundle = build_model("minilm_lora", num_classes=2, seed=0, max_length=seq).to(dev)
    texts = load_dataset("rotten_tomatoes").train
    assert isinstance(bundle, LoraTextBundle) and isinstance(texts, TextDataset)
    enc = bundle.tokenizer(
        [texts.texts[i] for i in range(bs)],
        padding="max_length",
        truncation=True,
        max_length=seq,
        return_tensors="pt",
    )
    inputs = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    labels = texts.y[:bs].to(dev)
    encoders.clear_cache()  # the cached pretrained copy is not part of any mode's cost
    params = [p for p in bundle.module.parameters() if p.requires_grad]
    opt: Any = torch.optim.SGD(params, lr=0.01)
    module: torch.nn.Module = bundle.module
    criterion: Any = None
    if mode != "nonprivate":
        loader = DataLoader(TensorDataset(torch.arange(10 * bs)), batch_size=bs)
        priv = make_private(
            bundle.module,
            opt,
            loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            poisson_sampling=False,
            noise_generator=torch.Generator(device=dev).manual_seed(0),
        )
        module, opt, criterion = priv.module, priv.optimizer, priv.criterion

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = module(**inputs)
        loss = criterion(logits, labels) if criterion else F.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    import gc

    gc.collect()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    reset_ok = _reset_peak()
    base_rss = _status_kib("VmRSS") * 1024
    times = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        t0 = time.perf_counter()
        step()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    peak_rss = _status_kib("VmHWM") * 1024 if reset_ok else 0
    if not reset_ok:  # whole-life peak: includes loading, so the increase is an upper bound
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "mode": mode,
        "median_step_s": sorted(times)[len(times) // 2],
        "step_times_s": times,
        "peak_increase_bytes": max(peak_rss - base_rss, 0),
        "peak_rss_bytes": peak_rss,
        "baseline_rss_bytes": base_rss,
        "peak_reset": reset_ok,
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        out["cuda_peak_increase_bytes"] = torch.cuda.max_memory_allocated() - base
        out["cuda_device"] = torch.cuda.get_device_name(dev)
    return out


def _spawn(cfg: dict[str, Any]) -> dict[str, Any]:
    code = (
        "import json, sys; from fedq.bench.dp import worker; "
        "print('@@' + json.dumps(worker(json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("@@")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench dp worker {cfg['mode']!r} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][2:]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or "nonprivate" not in modes:
        raise SystemExit(f"--modes: need 'nonprivate' and a subset of {MODES}, got {modes}")
    base = {k: getattr(args, k) for k in ("steps", "warmup", "batch_size", "seq_len", "threads")}
    base["device"] = args.device
    rows = [_spawn({**base, "mode": m}) for m in modes]
    ref = rows[0]
    mem_key = (
        "cuda_peak_increase_bytes" if args.device.startswith("cuda") else "peak_increase_bytes"
    )
    for r in rows:
        r["time_ratio"] = r["median_step_s"] / ref["median_step_s"]
        r["memory_ratio"] = r[mem_key] / max(ref[mem_key], 1)
        r["peak_rss_ratio"] = r["peak_rss_bytes"] / max(ref["peak_rss_bytes"], 1)
        r["goal_met"] = r["time_ratio"] <= TIME_GOAL and r["memory_ratio"] <= MEMORY_GOAL
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": ref["torch_threads"],
        "device": ref.get("cuda_device", "cpu"),
        "python": platform.python_version(),
    }
    print(
        f"\nfedq bench dp: minilm_lora (LoRA r=8 q/v + head), batch {args.batch_size} x "
        f"{args.seq_len} tokens, SGD; median of {args.steps} steps after {args.warmup} warm-up | "
        f"{machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
        f"device {machine['device']}"
    )
    mem_name = "CUDA peak alloc" if mem_key.startswith("cuda") else "peak RSS increase"
    print(
        f"{'mode':12s} {'step s':>8s} {'x time':>7s} {mem_name:>18s} {'x mem':>6s} "
        f"{'process peak':>13s} {'x':>5s} {'goal':>5s}"
    )
    for r in rows:
        print(
            f"{r['mode']:12s} {r['median_step_s']:8.3f} {r['time_ratio']:7.2f} "
            f"{r[mem_key] / 2**20:14.1f} MiB {r['memory_ratio']:6.2f} "
            f"{r['peak_rss_bytes'] / 2**20:9.1f} MiB {r['peak_rss_ratio']:5.2f} "
            f"{'-' if r is ref else ('PASS' if r['goal_met'] else 'FAIL'):>5s}"
        )
    print(
        f"goal: DP step <= {TIME_GOAL}x time and <= {MEMORY_GOAL}x memory ({mem_name} over the "
        "loaded model) of the non-private step; each mode ran in its own process"
    )
    return {
        "machine": machine,
        "config": {**base, "model": "minilm_lora", "data": "rotten_tomatoes"},
        "modes": rows,
        "goal": {"time_ratio": TIME_GOAL, "memory_ratio": MEMORY_GOAL},
    }
