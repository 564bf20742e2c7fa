"""The cost of many logical clients on one machine: seconds per round and peak memory of the whole
process tree at 100, 1,000 and 10,000 clients (by default), against the smallest size in the same
run.

Every size runs ``scenarios/scale_mnist1d.yaml`` with the same work per round (the same number of
selected clients, each with the same number of training rows: mnist1d is generated at the size
the client count needs), so what changes between sizes is only what grows with the number of
clients. Each size runs ``fedq simulate``'s code in a fresh process (Ray, gRPC and all), while
this process samples the RSS and PSS of that process and all its descendants (driver, Ray's own
processes, the server and worker actors). A round's seconds run from one round's record to the
next one's, so they include the driver's checkpoint. Nothing about time is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedq.bench.machine import cpu_model, machine_info
from fedq.bench.memory import TreeMemorySampler

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "scale_mnist1d.yaml"
#: What the issue asks of 10,000 clients on one machine: the whole process tree within this.
MEMORY_GOAL_GIB = 6.0
GIB = float(1 << 30)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", default="100,1000,10000", help="client counts, comma-separated")
    p.add_argument("--per-round", type=int, default=100, help="clients selected per round")
    p.add_argument("--rows-per-client", type=int, default=20, help="training rows per client")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backend", choices=("ray", "inprocess"), default="ray")
    p.add_argument("--workers", type=int, default=0, help="worker hosts (0: one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="further scenario overrides, applied to every size",
    )


def num_samples_for(clients: int, rows_per_client: int) -> int:
    """mnist1d rows (train + test, a multiple of 10) giving ``clients * rows_per_client`` training
    rows: the package keeps 80% for training."""
    return 10 * math.ceil(clients * rows_per_client / 0.8 / 10)


def overrides(args: argparse.Namespace, clients: int) -> list[str]:
    return [
        f"seed={args.seed}",
        f"rounds.num_clients={clients}",
        f"rounds.clients_per_round={min(args.per_round, clients)}",
        f"rounds.count={args.rounds}",
        f"data.num_samples={num_samples_for(clients, args.rows_per_client)}",
        f"runtime.backend={args.backend}",
        f"runtime.workers={args.workers}",
        *args.set,
    ]


def _child(sets: list[str], out: str, conn: Connection) -> None:
    """One size, in its own process: the run, with the time of every round's record."""
    from fedq.config import load_scenario
    from fedq.runtime.simulate import simulate

    cfg = load_scenario(SCENARIO, sets)
    marks: list[float] = []
    written: list[int] = []
    info: dict[str, Any] = {}
    last = [time.time_ns()]

    def on_start(i: dict[str, Any]) -> None:
        info.update(startup_seconds=i["startup_seconds"], workers=i["workers"])
        marks.append(time.perf_counter())

    def on_round(rec: dict[str, Any]) -> None:  # the round's checkpoint is written by now
        marks.append(time.perf_counter())
        new = [f.stat() for f in _checkpoint_files(Path(out))]
        written.append(sum(st.st_size for st in new if st.st_mtime_ns >= last[0]))
        last[0] = time.time_ns()

    summary = simulate(cfg, out, on_start=on_start, on_round=on_round)
    conn.send(
        {
            **info,
            "round_seconds": [b - a for a, b in itertools.pairwise(marks)],
            "checkpoint_written": written,
            "accuracy": summary["final_accuracy"],
            "bytes_wire": summary["bytes_wire_total"],
            "wall_seconds": summary["wall_seconds"],
            "checkpoint_bytes": sum(f.stat().st_size for f in _checkpoint_files(Path(out))),
        }
    )
    conn.close()


def _checkpoint_files(out: Path) -> list[Path]:
    """What a run's checkpoints consist of on disk (checkpoint.pt and its client segments)."""
    from fedq.runtime.checkpoint import CHECKPOINT_FILE, SEGMENT_PREFIX

    files = [out / CHECKPOINT_FILE, *out.glob(f"{SEGMENT_PREFIX}*.pt")]
    return [p for p in files if p.exists()]


def _prepare_data(sets: list[str]) -> None:
    """Generate (or find in the cache) the size's data before timing anything."""
    from fedq.config import load_scenario
    from fedq.runtime.setup import load_data

    load_data(load_scenario(SCENARIO, sets))


def measure(args: argparse.Namespace, clients: int, out: Path) -> dict[str, Any]:
    """Run one size in a fresh process; its numbers and the peak memory of its process tree."""
    sets = overrides(args, clients)
    _prepare_data(sets)
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sets, str(out), send), name=f"scale-{clients}")
    proc.start()
    send.close()
    with TreeMemorySampler(interval=0.25, pid=proc.pid) as mem:
        try:
            res: dict[str, Any] = recv.recv()
        except EOFError:
            res = {}
        proc.join()
    if proc.exitcode != 0 or not res:
        raise RuntimeError(f"the {clients}-client run failed (exit code {proc.exitcode})")
    rounds = res.pop("round_seconds")
    late = rounds[-max(1, len(rounds) // 4) :]
    return {
        "clients": clients,
        "clients_per_round": min(args.per_round, clients),
        "rounds": len(rounds),
        "seconds_per_round": statistics.median(rounds),
        "late_seconds_per_round": statistics.median(late),
        "checkpoint_written_per_round": statistics.median(res["checkpoint_written"][-len(late) :]),
        "round_seconds": [round(s, 3) for s in rounds],
        "peak_rss_gib": mem.peak_rss / GIB,
        "peak_pss_gib": mem.peak_pss / GIB,
        **res,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = sorted({int(c) for c in str(args.clients).split(",") if c.strip()})
    tmp = Path(tempfile.mkdtemp(prefix="fedq-bench-scale-"))
    try:  # the runs' folders: 10,000 clients' checkpoints are large
        rows = [measure(args, n, tmp / f"clients-{n}") for n in sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]
    print(
        f"\nfedq bench scale: mnist1d, {args.rows_per_client} training rows per client, "
        f"{args.per_round} clients per round, {args.rounds} rounds, {args.backend} backend, "
        f"seed {args.seed} | {cpu_model()}, {os.cpu_count()} cores"
    )
    print(
        f"{'clients':>8s} {'s/round':>8s} {'x':>6s} {'late':>6s} {'peak RSS':>9s} {'x':>6s} "
        f"{'peak PSS':>9s} {'x':>6s} {'start-up':>9s} {'ckpt/round':>11s} "
        f"{'ckpt total':>11s}"
    )
    for r in rows:
        r["seconds_ratio"] = r["seconds_per_round"] / base["seconds_per_round"]
        r["rss_ratio"] = r["peak_rss_gib"] / base["peak_rss_gib"]
        r["pss_ratio"] = r["peak_pss_gib"] / base["peak_pss_gib"]
        print(
            f"{r['clients']:8,d} {r['seconds_per_round']:8.2f} {r['seconds_ratio']:6.2f} "
            f"{r['late_seconds_per_round']:6.2f} "
            f"{r['peak_rss_gib']:7.2f} G {r['rss_ratio']:6.2f} {r['peak_pss_gib']:7.2f} G "
            f"{r['pss_ratio']:6.2f} {r['startup_seconds']:7.1f} s "
            f"{r['checkpoint_written_per_round'] / 2**20:7.2f} MiB "
            f"{r['checkpoint_bytes'] / 2**20:7.1f} MiB"
        )
    print(
        f"(x: ratio to {base['clients']:,} clients in this run; s/round: median over the "
        "rounds, checkpoint included; late: median of the last quarter of the rounds; "
        "memory: the whole process tree; ckpt/round: checkpoint bytes written per round, "
        "last quarter; ckpt total: on disk at the end)"
    )
    big = [r for r in rows if r["clients"] >= 10_000]
    result: dict[str, Any] = {
        "sizes": rows,
        "per_round": args.per_round,
        "rows_per_client": args.rows_per_client,
        "rounds": args.rounds,
        "backend": args.backend,
        "seed": args.seed,
        "machine": machine_info(),
    }
    if big:
        ok = all(r["peak_rss_gib"] <= MEMORY_GOAL_GIB for r in big)
        result["memory_goal_met"] = ok
        print(
            f"goal (10,000 clients: whole tree <= {MEMORY_GOAL_GIB:g} GiB RSS): "
            f"{'PASS' if ok else 'FAIL'}"
        )
    return result
