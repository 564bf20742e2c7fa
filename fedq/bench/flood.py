"""Upload flood: many valid clients push large updates at once; the server's memory against its
upload budget.

A real :class:`~fedq.transport.TransportServer` runs in its own (spawned) process with a handler
that keeps each update for ``--hold-s`` seconds (as decoding and aggregating would), and
``--clients`` clients, each with its own token and channel, upload ``--size-mib`` MiB each, all at
once, ``--waves`` times. The parent samples the server process's RSS throughout. Two cases in the
same run: the server with ``--budget-mib`` (an upload beyond it is refused as busy and the client
sends it again after a jittered backoff), and the baseline, a budget large enough for every upload
at once. Reported: the server's peak RSS above its idle RSS in both, the budget's own peak
accounting, the refusals and retries, and whether every upload was accepted in the end.
Results: BENCHMARKS.md, "Flood".
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from fedq.bench.machine import machine_info

MiB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=16, help="concurrent uploading clients")
    p.add_argument("--size-mib", type=int, default=16, help="payload of each upload (MiB)")
    p.add_argument("--budget-mib", type=int, default=64, help="the server's upload budget (MiB)")
    p.add_argument("--hold-s", type=float, default=0.5, help="time the handler keeps an update")
    p.add_argument("--waves", type=int, default=2, help="times every client uploads")


class _Holding:
    """Keeps each update for ``hold_s`` seconds, then lets it go."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.accepted = 0
        self._lock = threading.Lock()

    def get_task(self, client_id: str, round: int) -> Any:
        from fedq.errors import FedqError

        raise FedqError("no tasks here")

    def push_update(self, msg: Any) -> None:
        time.sleep(self.hold_s)
        with self._lock:
            self.accepted += 1


def _serve(conn: Connection, tokens: dict[str, str], budget: int, hold_s: float) -> None:
    import gc

    from fedq.transport import TransportServer
    from fedq.transport.budget import ServerLimits

    handler = _Holding(hold_s)
    limits = ServerLimits(upload_budget_bytes=budget, upload_wait_s=0.0)
    server = TransportServer(
        handler, tokens=tokens, max_workers=4 * len(tokens) + 8, server_limits=limits
    )
    server.start()
    gc.collect()
    conn.send(server.address)
    conn.recv()  # the flood is over
    b = server.upload_budget
    assert b is not None
    conn.send({"accepted": handler.accepted, "budget_peak": b.peak, "refused": b.refused})
    server.stop(0.5)


def flood(
    *, clients: int, size_mib: int, budget_mib: int, hold_s: float, waves: int
) -> dict[str, Any]:
    """One flood against a fresh server process; its memory and the budget's accounting."""
    import psutil

    from fedq.bench.transport import payload_message
    from fedq.errors import TransportError
    from fedq.transport import TransportClient

    tokens = {f"c{i}": f"token-{i}" for i in range(clients)}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, tokens, budget_mib * MiB, hold_s), daemon=True)
    proc.start()
    address = parent.recv()
    server = psutil.Process(proc.pid)
    time.sleep(0.5)
    idle = server.memory_info().rss
    base = payload_message(size_mib, seed=1)  # one payload, only read: every client sends it
    msgs = {cid: dataclasses.replace(base, client_id=cid) for cid in tokens}
    peak = idle
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server.memory_info().rss)
            time.sleep(0.01)

    errors: list[str] = []
    retries: list[int] = []

    def upload(cid: str) -> None:
        with TransportClient(address, client_id=cid, token=tokens[cid], timeout=600) as c:
            for _ in range(waves):
                try:
                    c.push_update(msgs[cid])
                except TransportError as e:
                    errors.append(f"{cid}: {e}")
            retries.append(c.budget_retries)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=upload, args=(cid,)) for cid in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    parent.send("done")
    stats = parent.recv()
    proc.join(10)
    return {
        "budget_mib": budget_mib,
        "idle_rss_mib": round(idle / MiB, 1),
        "peak_rss_over_idle_mib": round((peak - idle) / MiB, 1),
        "budget_peak_mib": round(stats["budget_peak"] / MiB, 1),
        "accepted": stats["accepted"],
        "uploads": clients * waves,
        "refused": stats["refused"],
        "client_retries": sum(retries),
        "errors": errors[:5],
        "seconds": round(seconds, 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    total = args.clients * args.size_mib
    kw = {
        "clients": args.clients,
        "size_mib": args.size_mib,
        "hold_s": args.hold_s,
        "waves": args.waves,
    }
    baseline = flood(budget_mib=2 * total + 64, **kw)  # room for every upload at once
    bounded = flood(budget_mib=args.budget_mib, **kw)
    print(
        f"{args.clients} clients x {args.size_mib} MiB uploads x {args.waves} waves "
        f"(handler holds each {args.hold_s:g} s)"
    )
    print(
        f"{'case':<22}{'budget MiB':>11}{'peak RSS over idle MiB':>24}{'budget peak MiB':>17}"
        f"{'accepted':>10}{'s':>8}"
    )
    for name, r in (("no effective budget", baseline), ("upload budget", bounded)):
        accepted = f"{r['accepted']}/{r['uploads']}"
        print(
            f"{name:<22}{r['budget_mib']:>11}{r['peak_rss_over_idle_mib']:>24}"
            f"{r['budget_peak_mib']:>17}{accepted:>10}{r['seconds']:>8}"
        )
    over = bounded["peak_rss_over_idle_mib"]
    print(
        f"bounded peak / budget: {over / args.budget_mib:.2f}; bounded peak / baseline peak: "
        f"{over / max(baseline['peak_rss_over_idle_mib'], 1e-9):.2f}"
    )
    return {
        "machine": machine_info(),
        "baseline": baseline,
        "bounded": bounded,
        "args": vars(args) | {"func": None},
    }
