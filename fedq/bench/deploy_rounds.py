"""Seconds per round of one federated run, deployed as processes vs simulated: the second part of
``fedq bench transport`` (``--part rounds``).

The same run (``scenarios/quickstart.yaml``: digits, MLP, 4-bit uplink with error feedback,
8-bit downlink; every client selected in every round) three ways, each through the real CLI as
subprocesses of this one:

- ``ray``: ``fedq simulate`` on the Ray backend (the default): the driver, Ray's own processes,
  a server actor and one worker actor per core, each hosting a share of the clients;
- ``inprocess``: ``fedq simulate`` with ``runtime.backend=inprocess``: every host in one process,
  the worker hosts' client nodes on threads;
- ``serve``: ``fedq serve`` and one ``fedq join`` process per client over TLS on loopback
  (credentials from ``fedq certs``, each site's data file from ``fedq shard``); the joins start
  once the server listens.

So what is compared is what carries the clients: a process per client, each importing torch,
loading its data and holding its own copy of the libraries, against Ray actors that host many
clients, or threads. The round protocol, seeds and data are the same (the deployment waits for
all its sites, so round 0 selects as the simulation does): the bytes and accuracy of every round
must be equal across the ways, and the table shows them. Every process runs torch on one thread
(``OMP_NUM_THREADS=1``), so N + 1 processes on a few cores do not oversubscribe them.

Per way: start-up (launch -> round 0 opened), round 0 (the engine's open -> close), seconds per
round (median over rounds 1.. of the time between consecutive records of ``metrics.jsonl``, taken
from the file's modification times, so the checkpoint and the opening of the next round count;
beside it the engine's open -> close of those rounds), bytes per round, the final accuracy, the
end (last record -> every process exited), wall time, and the peak RSS and PSS of the way's
processes with all their descendants. Nothing about time is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from fedq.bench.machine import cpu_model
from fedq.bench.memory import TreeMemorySampler
from fedq.bench.procs import CliProcess, run_cli
from fedq.errors import FedqError

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "quickstart.yaml"
WAYS = ("ray", "inprocess", "serve")
LABELS = {"ray": "fedq simulate (ray)", "inprocess": "fedq simulate (inprocess)"}
#: How long one way may take, start to end, before the bench gives up on it.
WAY_TIMEOUT_S = 900.0
#: How often the bench looks at a run's metrics.jsonl (the times come from the file itself).
POLL_S = 0.01
GIB = float(1 << 30)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rounds (serve + joins vs simulate)")
    g.add_argument("--clients", type=int, default=10, help="clients (all selected every round)")
    g.add_argument("--rounds", type=int, default=10, help="rounds of each run")
    g.add_argument(
        "--ways",
        default=",".join(WAYS),
        help=f"the ways to run, comma-separated, in this order ({', '.join(WAYS)})",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="further scenario overrides, applied to every way",
    )
    g.add_argument("--keep", metavar="DIR", help="keep the run folders and logs in DIR")


def overrides(args: argparse.Namespace) -> list[str]:
    """The scenario overrides every way runs with: all clients selected, and every one of them
    needed to open a round (so a deployment's round 0 waits for all its sites)."""
    n = args.clients
    return [
        f"seed={args.seed}",
        f"rounds.num_clients={n}",
        f"rounds.clients_per_round={n}",
        f"rounds.min_clients={n}",
        f"rounds.count={args.rounds}",
        *args.set,
    ]


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


class _Records:
    """The records of a run's metrics.jsonl as they are written, each with the file's
    modification time (ns) just after it was appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.written_ns: list[int] = []
        self._size = 0

    def poll(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        if st.st_size == self._size:
            return
        with self.path.open("rb") as f:
            f.seek(self._size)
            data = f.read()
        end = data.rfind(b"\n") + 1  # complete lines only
        for line in data[:end].splitlines():
            self.records.append(json.loads(line))
            self.written_ns.append(st.st_mtime_ns)
        self._size += end


def _setup(work: Path, sets: list[str], clients: int) -> None:
    """Credentials and one data file per site, for the ``serve`` way (not timed)."""
    run_cli(["certs", str(work / "certs"), "--clients", str(clients)], work, WAY_TIMEOUT_S)
    run_cli(
        ["shard", str(SCENARIO), *_sets(sets), "--out", str(work / "data")], work, WAY_TIMEOUT_S
    )


def run_way(way: str, work: Path, sets: list[str], clients: int) -> dict[str, Any]:
    """One way, start to end: its round times, bytes, accuracy and memory."""
    out = work / way
    records = _Records(out / "metrics.jsonl")
    procs: list[CliProcess] = []
    listening = None
    try:
        t0_ns, t0 = time.time_ns(), time.monotonic()
        deadline = t0 + WAY_TIMEOUT_S
        if way == "serve":
            c = work / "certs"
            serve = [
                "serve",
                str(SCENARIO),
                *_sets(sets),
                "--listen",
                "127.0.0.1:0",
                "--tokens",
                str(c / "tokens.yaml"),
                "--cert",
                str(c / "server.pem"),
                "--key",
                str(c / "server.key"),
                "--out",
                str(out),
            ]
            procs.append(CliProcess("serve", serve, work, WAY_TIMEOUT_S))
        else:
            procs.append(
                CliProcess(
                    way,
                    [
                        "simulate",
                        str(SCENARIO),
                        *_sets(sets),
                        "--set",
                        f"runtime.backend={way}",
                        "--out",
                        str(out),
                        "-q",
                    ],
                    work,
                    WAY_TIMEOUT_S,
                )
            )
        with TreeMemorySampler(interval=0.5, pid=procs[0].proc.pid) as mem:
            if way == "serve":
                t, line = procs[0].wait_line(r"^listening on \S+ \(", deadline - time.monotonic())
                address, listening = line.split()[2], t - t0
                c = work / "certs"
                for i in range(clients):
                    cid = f"client-{i}"
                    procs.append(
                        CliProcess(
                            cid,
                            [
                                "join",
                                "--server",
                                address,
                                "--client-id",
                                cid,
                                "--token-file",
                                str(c / "clients" / f"{cid}.token"),
                                "--ca",
                                str(c / "ca.pem"),
                                "--data",
                                f"npz:{work / 'data' / cid}.npz",
                                "--give-up-after",
                                "120",
                            ],
                            work,
                            WAY_TIMEOUT_S,
                        )
                    )
                    mem.track(procs[-1].proc.pid)
            while None in [p.proc.poll() for p in procs]:  # every one polled, not only the first
                records.poll()
                failed = next((p for p in procs if p.proc.returncode not in (None, 0)), None)
                if failed is not None:  # say so now, not when the others give up waiting
                    raise failed.failed()
                if time.monotonic() > deadline:
                    raise FedqError(f"bench transport: the {way} run took over {WAY_TIMEOUT_S:g} s")
                time.sleep(POLL_S)
            wall, end_ns = time.monotonic() - t0, time.time_ns()
        records.poll()
    finally:
        _stop(procs)
        for p in procs:
            p.write_log(work / "logs")
    for p in procs:
        if p.proc.returncode != 0:
            raise p.failed()
    return _summarize(way, records, (t0_ns, end_ns), wall, listening, mem, clients)


def _stop(procs: list[CliProcess]) -> None:
    """End what is still running (a way that failed): Ctrl-C first, as a user would (a
    simulation then stops its Ray processes), killed if it has not ended within 30 s."""
    running = [p for p in procs if p.proc.poll() is None]
    for p in running:
        p.proc.send_signal(signal.SIGINT)
    end = time.monotonic() + 30
    for p in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(max(0.0, end - time.monotonic()))
    for p in procs:
        p.end(0)  # killed if still running; its output read to the end


def _summarize(
    way: str,
    records: _Records,
    span_ns: tuple[int, int],
    wall: float,
    listening: float | None,
    mem: TreeMemorySampler,
    clients: int,
) -> dict[str, Any]:
    """A way's numbers; ``span_ns``: its launch and its end (every process exited), wall clock
    like the records' times."""
    recs, stamps = records.records, records.written_ns
    if not recs or [r["round"] for r in recs] != list(range(len(recs))):
        raise FedqError(
            f"bench transport: the {way} run logged rounds {[r['round'] for r in recs]}"
        )
    between = [(b - a) / 1e9 for a, b in itertools.pairwise(stamps)]
    opened0 = stamps[0] - int(recs[0]["round_seconds"] * 1e9)
    per_round = [int(r["bytes_up"]) + int(r["bytes_down"]) for r in recs]
    engine = [float(r["round_seconds"]) for r in recs]
    return {
        "way": way,
        "label": LABELS[way] if way != "serve" else f"fedq serve + {clients} joins (TLS)",
        "rounds": len(recs),
        "startup_s": round((opened0 - span_ns[0]) / 1e9, 3),
        "listening_s": None if listening is None else round(listening, 3),
        "round0_s": recs[0]["round_seconds"],
        "seconds_per_round": round(statistics.median(between), 4) if between else None,
        "round_seconds": [round(s, 4) for s in between],
        "engine_seconds_per_round": statistics.median(engine[1:]) if len(engine) > 1 else None,
        "engine_round_seconds": engine,
        "wall_s": round(wall, 3),
        "shutdown_s": round((span_ns[1] - stamps[-1]) / 1e9, 3),
        "bytes_per_round": statistics.median(per_round),
        "bytes": [[int(r["bytes_up"]), int(r["bytes_down"])] for r in recs],
        "accuracy": [r["accuracy"] for r in recs],
        "final_accuracy": recs[-1]["accuracy"],
        "peak_rss_gib": mem.peak_rss / GIB,
        "peak_pss_gib": mem.peak_pss / GIB,
        "peak_processes": mem.peak_processes,
    }


def _ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """``a`` over ``b``, for each time and the memory."""
    out: dict[str, float | None] = {}
    for k in (
        "startup_s",
        "round0_s",
        "seconds_per_round",
        "wall_s",
        "peak_rss_gib",
        "peak_pss_gib",
    ):
        out[k] = a[k] / b[k] if a[k] is not None and b[k] else None
    return out


def check_args(args: argparse.Namespace) -> list[str]:
    """The ways asked for (a usage error before anything runs when the options are wrong)."""
    ways = [w.strip() for w in str(args.ways).split(",") if w.strip()]
    if not ways or set(ways) - set(WAYS) or len(set(ways)) != len(ways):
        raise SystemExit(f"--ways: a comma-separated subset of {', '.join(WAYS)}")
    if args.clients < 1 or args.rounds < 1:
        raise SystemExit("--clients and --rounds must be positive")
    return ways


def run(args: argparse.Namespace) -> dict[str, Any]:
    ways = check_args(args)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedq-bench-rounds-"))
    work.mkdir(parents=True, exist_ok=True)
    sets = overrides(args)
    try:
        if "serve" in ways:
            _setup(work, sets, args.clients)
        rows = [run_way(w, work, sets, args.clients) for w in ways]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    by_way = {r["way"]: r for r in rows}
    ratios = {
        w: _ratios(by_way["serve"], r)
        for w, r in by_way.items()
        if "serve" in by_way and w != "serve"
    }
    agree = {
        "bytes": all(r["bytes"] == rows[0]["bytes"] for r in rows),
        "accuracy": all(r["accuracy"] == rows[0]["accuracy"] for r in rows),
    }
    result = {
        "config": {
            "scenario": SCENARIO.name,
            "clients": args.clients,
            "rounds": args.rounds,
            "clients_per_round": args.clients,
            "seed": args.seed,
            "overrides": sets,
            "ways": ways,
            "torch_threads_per_process": 1,
            "serve_transport": "TLS, loopback",
        },
        "ways": rows,
        "serve_over": ratios,
        "agree": agree,
    }
    _print_report(result)
    return result


def _print_report(result: dict[str, Any]) -> None:
    cfg, rows = result["config"], result["ways"]
    print(
        f"\nseconds per round: {cfg['scenario']} (digits, mlp), {cfg['clients']} clients all "
        f"selected, {cfg['rounds']} rounds, seed {cfg['seed']}, 1 torch thread per process | "
        f"{cpu_model()}, {os.cpu_count()} cores"
    )
    print(
        f"{'way':32s} {'start-up':>9s} {'round 0':>8s} {'s/round':>8s} {'engine':>7s} "
        f"{'end':>7s} {'wall':>7s} {'procs':>5s} {'peak RSS':>9s} {'peak PSS':>9s} "
        f"{'bytes/round':>11s} {'accuracy':>8s}"
    )
    for r in rows:
        spr, eng = (
            "-" if v is None else f"{v:.3f}"
            for v in (r["seconds_per_round"], r["engine_seconds_per_round"])
        )
        print(
            f"{r['label']:32s} {r['startup_s']:7.2f} s {r['round0_s']:6.2f} s {spr:>8s} "
            f"{eng:>7s} {r['shutdown_s']:5.1f} s {r['wall_s']:5.1f} s {r['peak_processes']:5d} "
            f"{r['peak_rss_gib']:7.2f} G {r['peak_pss_gib']:7.2f} G "
            f"{r['bytes_per_round']:11,.0f} {r['final_accuracy']:8.4f}"
        )
    for way, q in result["serve_over"].items():
        shown = ", ".join(
            f"{k} {v:.2f}x"
            for k, v in (
                ("start-up", q["startup_s"]),
                ("round 0", q["round0_s"]),
                ("s/round", q["seconds_per_round"]),
                ("wall", q["wall_s"]),
                ("peak RSS", q["peak_rss_gib"]),
                ("peak PSS", q["peak_pss_gib"]),
            )
            if v is not None
        )
        print(f"serve + joins / {LABELS[way].removeprefix('fedq ')}: {shown}")
    served = [r for r in rows if r["listening_s"] is not None]
    if served:
        print(f"fedq serve listened after {served[0]['listening_s']:.2f} s; the joins started then")
    agree = result["agree"]
    print(
        f"every round's bytes equal across the ways: {'yes' if agree['bytes'] else 'NO'}; "
        f"every round's accuracy equal: {'yes' if agree['accuracy'] else 'NO'}"
    )
    print(
        "(start-up: launch -> round 0 opened; round 0: its open -> close; s/round: median "
        "record-to-record time of rounds 1..; engine: their median open -> close; end: last "
        "record -> every process exited; memory: the way's processes and descendants, "
        "sampled every 0.5 s)"
    )
