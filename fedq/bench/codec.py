"""Codec throughput (GB/s against a same-run memcpy) and wire overhead of packed tensors.

Targets (codec throughput issue): on a 64 MiB fp32 tensor, quantize+pack and unpack+dequantize each
run at >= 15% of the memcpy bandwidth measured in the same run, at 1, 2, 3, 4, 8 bits and a mixed
per-channel map; protobuf framing adds <= 1% over payload + declared metadata for tensors of
>= 64K elements; a [4096, 1024] fp32 tensor at 4-bit per-channel shrinks >= 7.8x on the wire.
Timings are best-of-N (the machine may be shared); memcpy is measured before and after the codec
timings and the faster one is the baseline, which can only make the ratios more conservative.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from fedq.bench.machine import machine_info

if TYPE_CHECKING:  # torch and the codec load when the bench runs, not when the CLI starts
    import torch

    from fedq.codec import PackedTensor

TARGET_RATIO = 0.15
TARGET_FRAMING = 0.01
FRAMING_MIN_NUMEL = 64 * 1024
TARGET_COMPRESSION = 7.8
WIRE_SHAPES = [(4096, 1024), (512, 384), (64, 64), (1000003,)]
COLS = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size-mib", type=int, default=64, help="fp32 tensor size (rows of 4096)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case; best is kept")
    p.add_argument("--seed", type=int, default=0)


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best of ``repeats`` timed calls after one untimed warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return machine_info()


def _memcpy_gbps(x: torch.Tensor, repeats: int) -> float:
    import torch

    return x.nbytes / _best_seconds(lambda: torch.empty_like(x).copy_(x), repeats) / 1e9


def throughput(x: torch.Tensor, memcpy: float, repeats: int, seed: int) -> list[dict[str, Any]]:
    """quantize+pack and unpack+dequantize GB/s (fp32 input bytes / s) per bit setting."""
    import torch

    from fedq.codec import QuantSpec, dequantize, quantize

    gen = torch.Generator().manual_seed(seed)
    mixed = torch.randint(2, 9, (x.shape[0],), generator=gen, dtype=torch.uint8)
    cases: list[tuple[str, int | torch.Tensor]] = [(str(b), b) for b in (1, 2, 3, 4, 8)]
    cases.append(("mixed 2..8", mixed))
    spec = QuantSpec()  # per-channel (rows), asymmetric, fp16 scales, round-to-nearest
    rows = []
    for label, bits in cases:
        packed = quantize(x, bits, spec)
        q = x.nbytes / _best_seconds(partial(quantize, x, bits, spec), repeats) / 1e9
        d = x.nbytes / _best_seconds(partial(dequantize, packed), repeats) / 1e9
        rows.append(
            {
                "bits": label,
                "mean_bits": packed.mean_bits(),
                "quantize_gbps": q,
                "quantize_ratio": q / memcpy,
                "quantize_pass": q / memcpy >= TARGET_RATIO,
                "dequantize_gbps": d,
                "dequantize_ratio": d / memcpy,
                "dequantize_pass": d / memcpy >= TARGET_RATIO,
            }
        )
    return rows


def _wire_bytes(p: PackedTensor) -> int:
    from fedq.wire.serde import bundle_to_bytes

    return len(bundle_to_bytes({"w": p}))


def wire_overhead(seed: int) -> list[dict[str, Any]]:
    """Serialized bytes over declared bytes (payload + metadata) at 4-bit per-channel."""
    import torch

    from fedq.codec import QuantSpec, quantize

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for shape in WIRE_SHAPES:
        p = quantize(torch.randn(shape, generator=gen), 4, QuantSpec())
        declared = p.payload_nbytes + p.metadata_nbytes
        wire = _wire_bytes(p)
        overhead = wire / declared - 1
        numel = math.prod(shape)
        gated = numel >= FRAMING_MIN_NUMEL
        rows.append(
            {
                "shape": list(shape),
                "numel": numel,
                "granularity": p.granularity.value,
                "payload_bytes": p.payload_nbytes,
                "metadata_bytes": p.metadata_nbytes,
                "wire_bytes": wire,
                "overhead": overhead,
                "pass": overhead <= TARGET_FRAMING if gated else None,
            }
        )
    return rows


def compression(seed: int) -> dict[str, Any]:
    """fp32 bytes over wire bytes for one layer-sized tensor at 4-bit per-channel."""
    import torch

    from fedq.codec import QuantSpec, quantize

    shape = WIRE_SHAPES[0]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    wire = _wire_bytes(quantize(x, 4, QuantSpec()))
    ratio = x.nbytes / wire
    return {
        "shape": list(shape),
        "bits": 4,
        "fp32_bytes": x.nbytes,
        "wire_bytes": wire,
        "ratio": ratio,
        "pass": ratio >= TARGET_COMPRESSION,
    }


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def _print_report(result: dict[str, Any]) -> None:
    m, cfg = result["machine"], result["config"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads")
    print(
        f"tensor: fp32 {cfg['shape']} ({cfg['size_mib']} MiB), {cfg['spec']}, "
        f"best of {cfg['repeats']}"
    )
    print(f"memcpy (empty_like + copy_): {result['memcpy_gbps']:.2f} GB/s")
    print()
    print(f"{'bits':<11}{'quant GB/s':>11}{'ratio':>8}{'':>6}{'dequant GB/s':>14}{'ratio':>8}")
    for r in result["throughput"]:
        print(
            f"{r['bits']:<11}{r['quantize_gbps']:>11.2f}{r['quantize_ratio']:>8.0%}"
            f"{_verdict(r['quantize_pass']):>6}{r['dequantize_gbps']:>14.2f}"
            f"{r['dequantize_ratio']:>8.0%}{_verdict(r['dequantize_pass']):>6}"
        )
    print(f"(target: >= {TARGET_RATIO:.0%} of memcpy)")
    print()
    print(f"{'shape':<14}{'gran':>7}{'payload':>10}{'metadata':>10}{'wire':>10}{'overhead':>10}")
    for r in result["wire"]:
        print(
            f"{'x'.join(map(str, r['shape'])):<14}{r['granularity']:>7}{r['payload_bytes']:>10}"
            f"{r['metadata_bytes']:>10}{r['wire_bytes']:>10}{r['overhead']:>10.3%}"
            f"{_verdict(r['pass']):>6}"
        )
    print(f"(target: overhead <= {TARGET_FRAMING:.0%} for >= {FRAMING_MIN_NUMEL} elements)")
    c = result["compression"]
    print()
    print(
        f"fp32 / wire at 4-bit per-channel, {'x'.join(map(str, c['shape']))}: "
        f"{c['fp32_bytes']} / {c['wire_bytes']} = {c['ratio']:.2f}x "
        f"{_verdict(c['pass'])} (target >= {TARGET_COMPRESSION}x)"
    )
    print(f"all targets: {_verdict(result['all_pass'])}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.size_mib < 1 or args.repeats < 1:
        raise SystemExit("--size-mib and --repeats must be positive")
    import torch

    rows = args.size_mib * 2**20 // (4 * COLS)
    x = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(args.seed))
    before = _memcpy_gbps(x, args.repeats)
    speed = throughput(x, before, args.repeats, args.seed)
    memcpy = max(before, _memcpy_gbps(x, args.repeats))
    for r in speed:  # re-rate against the better baseline
        for k in ("quantize", "dequantize"):
            r[f"{k}_ratio"] = r[f"{k}_gbps"] / memcpy
            r[f"{k}_pass"] = r[f"{k}_ratio"] >= TARGET_RATIO
    wire = wire_overhead(args.seed)
    comp = compression(args.seed)
    checks = [r[f"{k}_pass"] for r in speed for k in ("quantize", "dequantize")]
    checks += [r["pass"] for r in wire if r["pass"] is not None] + [comp["pass"]]
    result: dict[str, Any] = {
        "bench": "codec",
        "machine": machine(),
        "config": {
            "shape": [rows, COLS],
            "size_mib": args.size_mib,
            "repeats": args.repeats,
            "seed": args.seed,
            "spec": "per-channel asymmetric, fp16 scales, round-to-nearest",
        },
        "memcpy_gbps": memcpy,
        "memcpy_gbps_before_after": [before, memcpy],
        "target_ratio": TARGET_RATIO,
        "throughput": speed,
        "wire": wire,
        "compression": comp,
        "all_pass": all(checks),
    }
    _print_report(result)
    return result
