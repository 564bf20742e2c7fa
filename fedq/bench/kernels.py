"""GPU kernels against memory bandwidth: unpack+dequantize and quantize+pack of ``fedq_kernels``.

On a CUDA device: GB/s at 1, 2, 3, 4, 8 bits and a mixed 2..8 map, fp32 tensors of 1 to 256 MiB
([rows, 4096], per-channel asymmetric, fp16 scales), against (a) a device-to-device copy in the
same run, (b) the GPU's peak memory bandwidth (spec sheet, by device name) and (c) the codec's
torch path on the same GPU; plus AMAQ's coding time per split step on a [32, 64, 384] cut
against the step's compute (a stand-in: six encoder layers of MiniLM-L6's size, forward and
backward). GB/s counts the bytes each operation must move: the fp32 tensor plus the payload
(a copy moves the tensor twice). Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed
before every run, median); quantize+pack is the kernel step (codes and payload from the block view
and per-block ranges), unpack+dequantize decodes a payload already on the device. Every case is
first checked bit-exact against the torch path on the GPU.

Targets (GPU kernels issue): >= 85% of peak for 2, 4 and 8 bits at >= 64 MiB (first bar 75%),
>= 60% for 1 and 3 bits and the mixed map, and never slower than the torch path.

Without a CUDA device nothing is timed: the bench runs a few cases through Triton's interpreter
(bit-exactness only) and says that GPU numbers need a CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from functools import partial
from typing import Any

from fedq.bench.machine import machine_info
from fedq.errors import CodecError

COLS = 4096
SIZES_MIB = (1, 4, 16, 64, 256)
BITS = ("1", "2", "3", "4", "8", "mixed")
TARGET_GATE_MIB = 64
TARGET_POW2, TARGET_POW2_FIRST, TARGET_OTHER = 0.85, 0.75, 0.60
#: Spec-sheet memory bandwidth (GB/s) by device name, most specific first.
PEAK_GBPS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 (HBM3)
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-SXM4-40GB", 1555.0),
    ("A100-PCIE-40GB", 1555.0),
)
NO_GPU = "GPU numbers need a CUDA device: none here, so nothing was timed."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes-mib",
        default=",".join(map(str, SIZES_MIB)),
        help="fp32 tensor sizes in MiB (rows of 4096)",
    )
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench time per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="only the interpreter correctness cases")


def peak_gbps(name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps
    return None


def target_for(bits: str) -> float:
    return TARGET_POW2 if bits in ("2", "4", "8") else TARGET_OTHER


# ---- without a GPU: interpreter smoke ---------------------------------------------------------


def smoke() -> dict[str, Any]:
    """A few layouts through the kernels under Triton's interpreter, bit-exact against torch."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fedq_kernels (and triton.jit) load
    if os.environ["TRITON_INTERPRET"] != "1":
        return {"ran": False, "reason": "TRITON_INTERPRET is set to something other than 1"}
    try:
        import fedq_kernels
    except ImportError as e:
        return {"ran": False, "reason": f"fedq_kernels cannot be imported ({e})"}
    import torch

    from fedq.codec import Granularity, QuantSpec, quantize

    g = torch.Generator().manual_seed(0)
    cases: list[tuple[str, tuple[int, ...], QuantSpec, int]] = [  # bits 0: a mixed map
        ("per-channel 3-bit", (64, 96), QuantSpec(), 3),
        (
            "last-axis mixed, row scales, outliers",
            (4, 16, 24),
            QuantSpec(axis=-1, row_scale=True, range="sigma", outlier_ratio=3.0),
            0,
        ),
        (
            "groups of 64, symmetric 4-bit",
            (1001,),
            QuantSpec(Granularity.GROUP, group_size=64, symmetric=True),
            4,
        ),
        ("middle axis 7-bit, stochastic", (6, 7, 5), QuantSpec(axis=1, stochastic=True), 7),
    ]
    rows = []
    for label, shape, spec, bits in cases:
        x = torch.randn(shape, generator=g) * 3
        nb = spec.layout_for(shape, bit_map=True).num_blocks
        bm = torch.randint(1, 9, (nb,), generator=g, dtype=torch.uint8)
        p = quantize(x, bm if bits == 0 else bits, spec, seed=1)
        decode = all(
            torch.equal(
                fedq_kernels.dequantize(p, dtype=dt).view(torch.uint8),
                fedq_kernels.dequantize_ref(p, dtype=dt).contiguous().view(torch.uint8),
            )
            for dt in (torch.float32, torch.float16, torch.bfloat16)
        )
        lay = p.layout
        xb = lay.to_blocks(x)
        div = torch.where(p.scales.float() > 0, p.scales.float(), 1.0)
        centre = (2 ** p.bits.to(torch.int32) - 1).float() / 2 if p.symmetric else None
        centre = p.offsets.float() if p.offsets is not None else centre
        assert centre is not None
        seed = 5 if spec.stochastic else None
        args = (xb, p.bits, lay, div, centre)
        pack = torch.equal(
            fedq_kernels.quantize_pack(*args, symmetric=p.symmetric, seed=seed),
            fedq_kernels.quantize_pack_ref(*args, symmetric=p.symmetric, seed=seed),
        )
        rows.append(
            {
                "case": label,
                "shape": list(shape),
                "dequantize_exact": decode,
                "quantize_pack_exact": pack,
            }
        )
    return {
        "ran": True,
        "cases": rows,
        "all_exact": all(r["dequantize_exact"] and r["quantize_pack_exact"] for r in rows),
    }


# ---- on a GPU ---------------------------------------------------------------------------------


#: ``timer(fn, rep_ms) -> milliseconds``.
Timer = Callable[[Callable[[], object], int], float]


def cuda_ms(fn: Callable[[], object], rep_ms: int) -> float:
    """Median milliseconds of ``fn`` on the GPU (``triton.testing.do_bench``: CUDA events, L2
    flushed before each run)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(rep_ms // 4, 10), rep=rep_ms, return_mode="median"))


def _case(x: Any, bits: str, rep_ms: int, seed: int, timer: Timer) -> dict[str, Any]:
    import fedq_kernels
    import torch

    from fedq.codec import QuantSpec, dispatch, quantize
    from fedq.codec.quantize import dequantize

    spec = QuantSpec()
    gen = torch.Generator().manual_seed(seed)
    bm: int | torch.Tensor = (
        torch.randint(2, 9, (x.shape[0],), generator=gen, dtype=torch.uint8)
        if bits == "mixed"
        else int(bits)
    )
    p = quantize(x, bm, spec)
    dev = x.device
    pd = dataclasses.replace(
        p,
        payload=p.payload.to(dev),
        scales=p.scales.to(dev),
        offsets=None if p.offsets is None else p.offsets.to(dev),
    )
    lay = p.layout
    xb = lay.to_blocks(x)
    s = pd.scales.float()
    div = torch.where(s > 0, s, 1.0)
    assert pd.offsets is not None
    centre = pd.offsets.float()
    plan = fedq_kernels.DecodePlan.build(pd, dev)
    args = (xb, p.bits, lay, div, centre)
    with dispatch.torch_only():
        exact = torch.equal(
            fedq_kernels.quantize_pack(*args, symmetric=False),
            fedq_kernels.quantize_pack_ref(*args, symmetric=False),
        ) and torch.equal(
            fedq_kernels.dequantize(pd, plan=plan).view(torch.int32),
            dequantize(pd, device=dev).contiguous().view(torch.int32),
        )
    moved = x.nbytes + p.payload_nbytes
    times = {
        "quantize_kernel_ms": timer(
            lambda: fedq_kernels.quantize_pack(*args, symmetric=False), rep_ms
        ),
        "quantize_torch_ms": timer(
            lambda: fedq_kernels.quantize_pack_ref(*args, symmetric=False), rep_ms
        ),
        "dequantize_kernel_ms": timer(lambda: fedq_kernels.dequantize(pd, plan=plan), rep_ms),
    }
    with dispatch.torch_only():
        times["dequantize_torch_ms"] = timer(lambda: dequantize(pd, device=dev), rep_ms)
    row: dict[str, Any] = {
        "bits": bits,
        "mean_bits": p.mean_bits(),
        "bytes_moved": moved,
        "exact": exact,
        **times,
    }
    for op in ("quantize", "dequantize"):
        for path in ("kernel", "torch"):
            row[f"{op}_{path}_gbps"] = moved / (times[f"{op}_{path}_ms"] * 1e-3) / 1e9
    return row


def amaq_overhead(
    rep_ms: int, timer: Timer, device: Any, shape: tuple[int, int, int] = (32, 64, 384)
) -> dict[str, Any]:
    """Coding per split step at a ``[B, T, 384]`` cut (activations and gradients, sender and
    receiver) on the kernel path and the torch path, against a stand-in step's compute."""
    import torch
    from torch import nn

    from fedq.adapt.amaq import AmaqQuantizer
    from fedq.codec import dispatch
    from fedq.codec.quantize import dequantize

    dev = torch.device(device)
    torch.manual_seed(0)
    act = AmaqQuantizer(
        384, b_min=2, init_bits=4.0, quant_range="mse", row_scale=True, outlier_ratio=3.0
    ).to(dev)
    grad = AmaqQuantizer(
        384,
        b_min=2,
        init_bits=4.0,
        quant_range="mse",
        row_scale=True,
        scale_dtype="float32",
        stochastic=True,
        seed=1,
    ).to(dev)
    x = torch.randn(shape, device=dev, requires_grad=True)
    g = torch.randn(shape, device=dev) * 1e-3

    def coding() -> None:
        _, p = act.forward_encode(x)
        dequantize(p, device=dev)  # the receiver's decode
        _, pg, _ = grad.quantize_gradient(g)
        dequantize(pg, device=dev)
        act.gate.grad = grad.gate.grad = None

    layer = nn.TransformerEncoderLayer(384, 12, 1536, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).to(dev)
    h = torch.randn(shape, device=dev)

    def step() -> None:
        model(h).square().mean().backward()
        model.zero_grad(set_to_none=True)

    kernel = timer(coding, rep_ms)
    with dispatch.torch_only():
        plain = timer(coding, rep_ms)
    compute = timer(step, rep_ms)
    return {
        "shape": list(shape),
        "coding_kernel_ms": kernel,
        "coding_torch_ms": plain,
        "step_compute_ms": compute,
        "overhead_kernel": kernel / compute,
        "overhead_torch": plain / compute,
    }


def measure(
    sizes_mib: list[float],
    rep_ms: int,
    seed: int,
    *,
    device: Any = "cuda",
    timer: Timer = cuda_ms,
    amaq_shape: tuple[int, int, int] = (32, 64, 384),
) -> dict[str, Any]:
    """Every timing of the bench on ``device`` (the tests run it on the CPU, through the
    interpreter, with a wall-clock timer, to check the code path, not the numbers)."""
    import torch

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    peak = peak_gbps(name) if dev.type == "cuda" else None
    rows = []
    copies = {}
    for size in sizes_mib:
        x = torch.randn(
            max(1, int(size * 2**20) // (4 * COLS)),
            COLS,
            device=dev,
            generator=torch.Generator(dev).manual_seed(seed),
        )
        y = torch.empty_like(x)
        copy_ms = timer(partial(y.copy_, x), rep_ms)
        copies[f"{size:g}"] = 2 * x.nbytes / (copy_ms * 1e-3) / 1e9
        for bits in BITS:
            row = _case(x, bits, rep_ms, seed, timer)
            row["size_mib"] = size
            for op in ("quantize", "dequantize"):
                gbps = row[f"{op}_kernel_gbps"]
                row[f"{op}_vs_copy"] = gbps / copies[f"{size:g}"]
                row[f"{op}_of_peak"] = None if peak is None else gbps / peak
                row[f"{op}_speedup"] = row[f"{op}_torch_ms"] / row[f"{op}_kernel_ms"]
            rows.append(row)
        del x, y
    result: dict[str, Any] = {
        "cuda": dev.type == "cuda",
        "device": name,
        "peak_gbps": peak,
        "copy_gbps": copies,
        "rows": rows,
        "amaq": amaq_overhead(rep_ms, timer, dev, amaq_shape),
    }
    result["targets"] = _verdicts(rows, peak)
    return result


def _verdicts(rows: list[dict[str, Any]], peak: float | None) -> dict[str, Any]:
    """Per (op, bits) at sizes >= 64 MiB: share of peak (of the measured copy where the peak is
    unknown) against the goal, and whether the kernel is never slower than torch anywhere."""
    out: dict[str, Any] = {
        "never_slower": all(
            r[f"{op}_speedup"] >= 1.0 for r in rows for op in ("quantize", "dequantize")
        )
    }
    gated = [r for r in rows if r["size_mib"] >= TARGET_GATE_MIB]
    checks = []
    for r in gated:
        for op in ("quantize", "dequantize"):
            share = r[f"{op}_of_peak"] if peak is not None else r[f"{op}_vs_copy"]
            goal = target_for(r["bits"])
            first = TARGET_POW2_FIRST if goal == TARGET_POW2 else goal
            checks.append(
                {
                    "op": op,
                    "bits": r["bits"],
                    "size_mib": r["size_mib"],
                    "share": share,
                    "goal": goal,
                    "pass": share >= goal,
                    "first_bar_pass": share >= first,
                }
            )
    out["checks"] = checks
    out["all_pass"] = out["never_slower"] and all(c["pass"] for c in checks) and bool(checks)
    out["reference"] = "spec peak" if peak is not None else "measured copy (peak unknown)"
    return out


def _print_gpu(result: dict[str, Any]) -> None:
    peak = result["peak_gbps"]
    print(f"device: {result['device']}, peak {peak or 'unknown'} GB/s (spec sheet)")
    print("GB/s = (fp32 tensor + payload bytes) / median time; copy moves the tensor twice")
    cols = f"{'%peak':>7}{'/copy':>7}{'x torch':>8}"
    print(
        f"{'MiB':>5}{'bits':>7}{'copy':>8} | {'dequant':>8}{cols} | {'quant':>8}{cols}{'exact':>7}"
    )
    for r in result["rows"]:
        cells = []
        for op in ("dequantize", "quantize"):
            of_peak = r[f"{op}_of_peak"]
            cells.append(
                f"{r[f'{op}_kernel_gbps']:>8.0f}"
                f"{'-' if of_peak is None else f'{of_peak:.0%}':>7}"
                f"{r[f'{op}_vs_copy']:>7.0%}{r[f'{op}_speedup']:>8.1f}"
            )
        copy = result["copy_gbps"][f"{r['size_mib']:g}"]
        print(
            f"{r['size_mib']:>5g}{r['bits']:>7}{copy:>8.0f} | {cells[0]} | {cells[1]}"
            f"{'yes' if r['exact'] else 'NO':>7}"
        )
    a = result["amaq"]
    print(
        f"AMAQ coding per split step ({'x'.join(map(str, a['shape']))}, both directions): "
        f"kernels {a['coding_kernel_ms']:.2f} ms, torch {a['coding_torch_ms']:.2f} ms; "
        f"step compute {a['step_compute_ms']:.2f} ms -> overhead "
        f"{a['overhead_kernel']:.1%} (torch {a['overhead_torch']:.1%})"
    )
    t = result["targets"]
    print(
        f"targets (>= {TARGET_GATE_MIB} MiB, share of {t['reference']}): 2/4/8 bits >= "
        f"{TARGET_POW2:.0%} (first bar {TARGET_POW2_FIRST:.0%}), 1/3/mixed >= {TARGET_OTHER:.0%}"
    )
    for c in t["checks"]:
        verdict = "PASS" if c["pass"] else ("first bar" if c["first_bar_pass"] else "FAIL")
        print(
            f"  {c['op']:<10}{c['bits']:>6} bits {c['size_mib']:>4g} MiB: {c['share']:.0%} "
            f"{verdict}"
        )
    print(f"never slower than torch: {'PASS' if t['never_slower'] else 'FAIL'}")
    print(f"all targets: {'PASS' if t['all_pass'] else 'FAIL'}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    result: dict[str, Any] = {"bench": "kernels", "machine": machine_info()}
    if torch.cuda.is_available() and not args.smoke:
        if os.environ.get("TRITON_INTERPRET", "") == "1":
            raise SystemExit("TRITON_INTERPRET=1 would time Triton's interpreter: unset it")
        sizes = [float(s) for s in str(args.sizes_mib).split(",") if s]
        result.update(measure(sizes, args.rep_ms, args.seed))
        _print_gpu(result)
        if not all(r["exact"] for r in result["rows"]):
            raise CodecError("fedq_kernels differ from the torch path on this GPU (column 'exact')")
        return result
    result["cuda"] = torch.cuda.is_available()
    result["smoke"] = s = smoke()
    if not result["cuda"]:
        result["message"] = NO_GPU
        print(f"fedq bench kernels: {NO_GPU}")
    if not s["ran"]:
        print(f"interpreter smoke not run: {s['reason']}")
        return result
    for c in s["cases"]:
        ok = c["dequantize_exact"] and c["quantize_pack_exact"]
        print(
            f"  {c['case']:<40}{'x'.join(map(str, c['shape'])):>10}  "
            f"{'bit-exact' if ok else 'MISMATCH'}"
        )
    print(
        f"interpreter smoke (Triton interpreter on the CPU, correctness only): "
        f"{len(s['cases'])} cases, {'all bit-exact' if s['all_exact'] else 'MISMATCHES'}"
    )
    if not s["all_exact"]:
        raise CodecError("fedq_kernels differ from the torch path (see the cases above)")
    return result
