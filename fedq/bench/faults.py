"""Fault handling, timed on the real CLI: ``fedq serve`` and three ``fedq join`` processes on
loopback over TLS (credentials from ``fedq certs``), the quickstart scenario with three clients.

client-0 trains on the whole digits training split and the other two on a tenth each, so client-0
delivers last in every round; when it fails after the other two delivered, the time until the
server closes the round is the time the server takes to notice, nothing else. Three cases, each
its own run, each against baselines of that same run:

- dead client: client-0 is SIGKILLed; its work stream closes and the server drops it as soon as
  it sees that. Kill -> the server's line for the round, against the round time with all three
  delivering.
- stalled client: client-0 is SIGSTOPped; its connection stays open and silent, so the round
  closes ``rounds.timeout_s`` after it opened. The round's time (open -> close, the server's
  clock) against that deadline.
- server restart: ``fedq serve`` is SIGKILLed mid-round (the other two delivered) and started
  again with ``--resume``; the joins reconnect with backoff and the round runs again. Restart ->
  its first completed round (and -> listening, -> all clients back), against the round time and
  a cold start (``fedq serve`` and the joins started together -> the first completed round).

Every process runs torch on one thread (four of them share the machine). Times are printed and
returned, never asserted. Results: BENCHMARKS.md, "Faults".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fedq.bench.machine import cpu_model, machine_info
from fedq.bench.procs import CliProcess, run_cli
from fedq.errors import FedqError

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "quickstart.yaml"
CLIENTS = ("client-0", "client-1", "client-2")
SLOW = CLIENTS[0]  # holds the whole training split: the last to deliver
#: How long one step of a case may take (start, a round, a shutdown) before the bench gives up.
STEP_TIMEOUT_S = 300.0
_ROUND_LINE = r"^round {r}: (\d+)/(\d+) updates"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--epochs",
        type=int,
        default=20,
        help="local epochs per round (client-0's round time grows with it)",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="rounds.timeout_s: when a stalled client is dropped",
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="full rounds (all three delivering) before the fault"
    )
    p.add_argument("--keep", metavar="DIR", help="keep the run folders and logs in DIR")


class _Case:
    """One run: a ``fedq serve`` and three joins sharing credentials and data files."""

    def __init__(self, name: str, work: Path, args: argparse.Namespace, min_clients: int) -> None:
        self.name = name
        self.work = work
        self.out = work / name
        self.over = [
            "--set",
            "rounds.num_clients=3",
            "--set",
            "rounds.clients_per_round=3",
            "--set",
            f"rounds.min_clients={min_clients}",
            "--set",
            "rounds.count=1000",
            "--set",
            f"train.local_epochs={args.epochs}",
            "--set",
            f"rounds.timeout_s={args.round_timeout:g}",
        ]
        self.port = _free_port()
        self.procs: list[CliProcess] = []
        self.server: CliProcess | None = None
        self.joins: dict[str, CliProcess] = {}

    def serve(self, *extra: str) -> CliProcess:
        c = self.work / "certs"
        args = [
            "serve",
            *extra,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--tokens",
            str(c / "tokens.yaml"),
            "--cert",
            str(c / "server.pem"),
            "--key",
            str(c / "server.key"),
            "--out",
            str(self.out),
        ]
        if "--resume" not in extra:
            args[1:1] = [str(SCENARIO), *self.over]
        who = "resumed server" if "--resume" in extra else "server"
        self.server = CliProcess(f"{self.name} {who}", args, self.work, STEP_TIMEOUT_S)
        self.procs.append(self.server)
        return self.server

    def join_all(self) -> None:
        c = self.work / "certs"
        for cid in CLIENTS:
            data = "digits" if cid == SLOW else f"npz:{self.work / 'data' / cid}.npz"
            args = [
                "join",
                "--server",
                f"127.0.0.1:{self.port}",
                "--client-id",
                cid,
                "--token-file",
                str(c / "clients" / f"{cid}.token"),
                "--ca",
                str(c / "ca.pem"),
                "--data",
                data,
                "--give-up-after",
                "120",
            ]
            self.joins[cid] = CliProcess(f"{self.name} {cid}", args, self.work, STEP_TIMEOUT_S)
            self.procs.append(self.joins[cid])

    def first_round_with_all(self) -> int:
        """Wait until every site has joined; returns the first round opened after that. With
        ``min_clients`` below the number of sites, rounds go on with the first sites to join
        while a slower one still starts up (it loads a whole data set)."""
        assert self.server is not None
        for j in self.joins.values():
            j.wait_for(r"^joined run ")
        closed = self.server.count(_ROUND_LINE.format(r=r"\d+"))
        return closed + 1  # the round open now may have opened before the last site joined

    def full_rounds(self, n: int, first: int = 0) -> list[int]:
        """Wait for ``n`` rounds from ``first`` on with all three delivering; returns them (the
        round after the last one is open now)."""
        assert self.server is not None
        r = first
        full: list[int] = []
        while len(full) < n:
            self.server.wait_for(_ROUND_LINE.format(r=r))
            if self.record(r)["clients_ok"] == 3:
                full.append(r)
            r += 1
            if r - first >= 2 * n + 3 and len(full) < n:
                raise FedqError(
                    f"bench faults: only {len(full)} of {r - first} rounds had all three "
                    "clients deliver (see the records in --keep DIR); lower --epochs or raise "
                    "--round-timeout"
                )
        return full

    def others_delivered(self, r: int) -> None:
        """Wait until the two fast clients delivered round ``r``; the slow one must still be
        working on it (else the fault would miss the round)."""
        for cid in CLIENTS[1:]:
            self.joins[cid].wait_for(rf"^round {r}: done")
        if self.joins[SLOW].seen(rf"^round {r}: done"):
            raise FedqError(
                f"bench faults: {SLOW} finished round {r} before the others; "
                "raise --epochs so that it is the last to deliver"
            )

    def record(self, r: int) -> dict[str, Any]:
        for line in (self.out / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["round"] == r:
                return dict(rec)
        raise FedqError(f"bench faults: no record of round {r} in {self.out}")

    def round_seconds(self, rounds: list[int]) -> float:
        """Median open -> close time (the server's clock) of ``rounds``."""
        return float(statistics.median(self.record(r)["round_seconds"] for r in rounds))

    def stop(self) -> None:
        """End the run: SIGINT to the server (it tells the clients the run is over), then make
        sure no process of this case is left."""
        if self.server is not None and self.server.proc.poll() is None:
            self.server.signal(signal.SIGINT)
        for p in reversed(self.procs):
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGCONT)
            p.end(30 if p is self.server else 10)
        for p in self.procs:
            p.write_log(self.work / "logs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setup(work: Path) -> None:
    run_cli(["certs", str(work / "certs"), "--clients", "3"], work, STEP_TIMEOUT_S)
    run_cli(
        [
            "shard",
            str(SCENARIO),
            "--set",
            "rounds.num_clients=10",
            "--set",
            "data.partition=iid",
            "--out",
            str(work / "data"),
        ],
        work,
        STEP_TIMEOUT_S,
    )


def _client_fault(work: Path, args: argparse.Namespace, sig: int) -> dict[str, Any]:
    """Dead (SIGKILL) or stalled (SIGSTOP) client-0 in the round after ``--rounds`` full ones."""
    case = _Case("dead" if sig == signal.SIGKILL else "stalled", work, args, min_clients=2)
    try:
        server = case.serve()
        server.wait_for(r"^listening on ")
        case.join_all()
        full = case.full_rounds(args.rounds, first=case.first_round_with_all())
        r = full[-1] + 1
        case.others_delivered(r)
        t_fault = case.joins[SLOW].signal(sig)
        t_close = server.wait_for(_ROUND_LINE.format(r=r))
        rec = case.record(r)
        case.joins[SLOW].proc.kill()  # a stopped client would only reconnect until killed
        why = rec["dropped"].get(SLOW)
        if why is None:
            raise FedqError(f"bench faults: {SLOW} was not dropped from round {r}: {rec}")
        normal = case.round_seconds(full)
    finally:
        case.stop()
    out = {
        "round": r,
        "dropped_because": why,
        "normal_round_s": round(normal, 3),
        "fault_round_s": rec["round_seconds"],
        "fault_to_close_s": round(t_close - t_fault, 3),
        "applied": rec["applied"],
        "clients_ok": rec["clients_ok"],
    }
    if sig == signal.SIGKILL:
        out["ratio_to_normal_round"] = out["fault_to_close_s"] / normal
    else:
        out["deadline_s"] = args.round_timeout
        out["ratio_to_deadline"] = rec["round_seconds"] / args.round_timeout
    return out


def _server_restart(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Cold start, full rounds, SIGKILL of the server mid-round, ``fedq serve --resume``."""
    case = _Case("restart", work, args, min_clients=3)
    try:
        t_start = time.monotonic()
        server = case.serve()
        case.join_all()  # started with the server, as a user would: they back off until it listens
        cold = server.wait_for(_ROUND_LINE.format(r=0)) - t_start
        full = case.full_rounds(args.rounds, first=1)
        r = full[-1] + 1
        case.others_delivered(r)
        server.signal(signal.SIGKILL)
        server.end()
        t_restart = time.monotonic()
        server = case.serve("--resume", str(case.out))
        listening = server.wait_for(r"^listening on ") - t_restart
        # each site says when it registered again (the server's own list is polled)
        back = max(j.wait_for(r"^joined run ", after=t_restart) for j in case.joins.values())
        back -= t_restart
        first = server.wait_for(_ROUND_LINE.format(r=r)) - t_restart
        rec = case.record(r)
        normal = case.round_seconds(full)
    finally:
        case.stop()
    return {
        "round": r,
        "normal_round_s": round(normal, 3),
        "cold_start_s": round(cold, 3),
        "restart_to_listening_s": round(listening, 3),
        "restart_to_all_clients_s": round(back, 3),
        "restart_to_first_round_s": round(first, 3),
        "rerun_round_s": rec["round_seconds"],
        "ratio_to_normal_round": first / normal,
        "ratio_to_cold_start": first / cold,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedq-bench-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        _setup(work)
        dead = _client_fault(work, args, signal.SIGKILL)
        stalled = _client_fault(work, args, signal.SIGSTOP)
        restart = _server_restart(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nfedq bench faults: quickstart (digits, mlp), fedq serve + 3 fedq join over TLS on "
        f"loopback, {args.epochs} local epochs, rounds.timeout_s {args.round_timeout:g}, "
        "1 torch thread per process | "
        f"{cpu_model()}, {os.cpu_count()} cores"
    )
    rows = [
        (
            "dead client",
            "kill -> round closed",
            dead["fault_to_close_s"],
            "round, all delivering",
            dead["normal_round_s"],
            dead["ratio_to_normal_round"],
        ),
        (
            "stalled client",
            "round open -> closed",
            stalled["fault_round_s"],
            "rounds.timeout_s",
            stalled["deadline_s"],
            stalled["ratio_to_deadline"],
        ),
        (
            "server restart",
            "restart -> round closed",
            restart["restart_to_first_round_s"],
            "round, all delivering",
            restart["normal_round_s"],
            restart["ratio_to_normal_round"],
        ),
        (
            "",
            "",
            restart["restart_to_first_round_s"],
            "cold start -> round closed",
            restart["cold_start_s"],
            restart["ratio_to_cold_start"],
        ),
    ]
    print(f"{'case':15s} {'measured':35s} {'baseline, same run':38s} {'ratio':>7s}")
    for case, what, value, base, base_value, ratio in rows:
        print(f"{case:15s} {what:24s} {value:8.2f} s {base:27s} {base_value:8.2f} s {ratio:7.3f}")
    print(
        f"server restart: listening after {restart['restart_to_listening_s']:.2f} s, all 3 "
        f"clients back after {restart['restart_to_all_clients_s']:.2f} s; dropped: the dead "
        f"client as '{dead['dropped_because']}', the stalled one as "
        f"'{stalled['dropped_because']}'"
    )
    return {
        "bench": "faults",
        "machine": machine_info(),
        "config": {
            "epochs": args.epochs,
            "round_timeout_s": args.round_timeout,
            "full_rounds_before_fault": args.rounds,
            "transport": "TLS, loopback",
            "torch_threads_per_process": 1,
            "scenario": "quickstart.yaml",
        },
        "dead_client": dead,
        "stalled_client": stalled,
        "server_restart": restart,
    }
