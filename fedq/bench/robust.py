"""Robust aggregation under attack: accuracy with 1, 2 and 3 attackers of 10 clients.

The server, the honest clients and the attackers run in this process over real gRPC on loopback
(the in-process backend's hosts: a :class:`~fedq.runtime.hosts.ServerHost` and one
:class:`~fedq.runtime.hosts.WorkerHost` per side, each with its own token). An attacker trains as
an honest client would and then replaces its update before it is sent: ``sign_flip`` sends -4 x
its delta, ``scaled`` 10 x its delta, ``noise`` Gaussian noise with 10 x the delta's RMS per
entry (all within the server's magnitude bound, so they reach the aggregator). For each
aggregator (``mean``, ``median``, ``trimmed_mean``, ``krum``) the table shows the final accuracy
and its ratio to the clean run (no attacker) with the plain mean, all with the same seeds.
``poison`` (3e38 in every entry), ``oversized`` (tensors of the wrong shape) and ``tamper``
(random 8-bit codes with shifted offsets) are the bad updates the server refuses
(tests/fed/test_hostile_clients.py). Results: BENCHMARKS.md, "Robust aggregation".
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedq.bench.machine import machine_info

if TYPE_CHECKING:  # torch is imported where used: `fedq --help` lists this bench
    import torch

ATTACKS = ("sign_flip", "scaled", "noise")
BAD = ("poison", "oversized", "tamper")
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")
#: The digits setting: quickstart's model, data and codecs, every client in every round.
BASE: dict[str, Any] = {
    "name": "robust",
    "seed": 0,
    "data": {"name": "digits", "partition": "iid"},
    "model": {"name": "mlp", "hidden": 64},
    "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
    "rounds": {
        "count": 10,
        "num_clients": 10,
        "clients_per_round": 10,
        "min_clients": 1,
        "eval_every": 10,
        "timeout_s": 120,
    },
    "compression": {
        "uplink": {"policy": "fixed", "bits": 8},
        "downlink": {"policy": "fixed", "bits": 8},
    },
    "runtime": {"backend": "inprocess"},
}
#: Each aggregator's settings for up to 3 attackers of 10.
DEFENCE: dict[str, dict[str, Any]] = {
    "mean": {"aggregator": "mean"},
    "median": {"aggregator": "median"},
    "trimmed_mean": {"aggregator": "trimmed_mean", "trim_fraction": 0.3},
    "krum": {"aggregator": "krum", "krum_f": 3, "krum_m": 7},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=10, help="rounds per run")
    p.add_argument(
        "--attackers",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="numbers of attackers (of 10 clients)",
    )
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS), choices=AGGREGATORS)
    p.add_argument(
        "--quick", action="store_true", help="3 rounds, 2 attackers, sign_flip only: a smoke test"
    )


def attacked(kind: str, delta: Mapping[str, torch.Tensor], gen: torch.Generator) -> dict[str, Any]:
    """The update an attacker sends instead of its honest ``delta`` (packed tensors)."""
    import torch

    from fedq.codec import quantize, raw

    if kind == "sign_flip":
        return {k: quantize(-4.0 * d, 8) for k, d in delta.items()}
    if kind == "scaled":
        return {k: quantize(10.0 * d, 8) for k, d in delta.items()}
    if kind == "noise":
        out = {}
        for k, d in delta.items():
            rms = float(d.pow(2).mean().sqrt()) if d.numel() else 0.0
            out[k] = quantize(torch.randn(d.shape, generator=gen) * 10.0 * max(rms, 1e-3), 8)
        return out
    if kind == "poison":
        return {k: raw(torch.full_like(d, 3e38)) for k, d in delta.items()}
    if kind == "oversized":
        return {k: raw(torch.zeros(d.numel() * 4 + 1)) for k, d in delta.items()}
    if kind == "tamper":
        out = {}
        for k, d in delta.items():
            p = quantize(d, 8)
            codes = torch.randint(0, 256, p.payload.shape, generator=gen, dtype=torch.uint8)
            shifted = None if p.offsets is None else (p.offsets.float() + 5e4).to(p.offsets.dtype)
            out[k] = dataclasses.replace(p, payload=codes, offsets=shifted)
        return out
    raise ValueError(f"unknown attack {kind!r}")


class _AttackingConnection:
    """A client's connection whose updates are replaced by ``kind``'s."""

    def __init__(self, conn: Any, kind: str, gen: torch.Generator) -> None:
        self._conn, self._kind, self._gen = conn, kind, gen
        self.refused = 0

    def push_update(self, msg: Any) -> int:
        from fedq.codec import dequantize
        from fedq.errors import FedqError
        from fedq.wire import MessageKind

        if msg.kind == MessageKind.UPDATE:
            delta = {k: dequantize(p) for k, p in msg.tensors.items()}
            msg = dataclasses.replace(msg, tensors=attacked(self._kind, delta, self._gen))
        try:
            return int(self._conn.push_update(msg))
        except FedqError:
            self.refused += 1
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _AttackingRunner:
    """A client runner that trains honestly and sends ``kind``'s update instead."""

    def __init__(self, inner: Any, kinds: Sequence[str], seed: int) -> None:
        import torch

        self._inner, self._kinds = inner, list(kinds)
        self._gen = torch.Generator().manual_seed(seed)
        self.sent = 0
        self.refused = 0

    def run(self, task: Any, conn: Any) -> dict[str, Any]:
        kind = self._kinds[self.sent % len(self._kinds)]
        self.sent += 1
        wrapped = _AttackingConnection(conn, kind, self._gen)
        try:
            return dict(self._inner.run(task, wrapped))
        finally:
            self.refused += wrapped.refused

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def run_attacked(
    cfg: Any, attackers: Sequence[int], kinds: Sequence[str], *, timeout_s: float = 600.0
) -> dict[str, Any]:
    """One run on loopback with ``attackers`` (roster indices) sending ``kinds`` in turn: the
    round records, the final accuracy, and what the attackers sent and had refused."""
    import secrets

    from fedq.rounds import client_name
    from fedq.runtime.hosts import ServerHost, WorkerHost

    n = cfg.rounds.num_clients
    bad = sorted(set(attackers))
    sides = {"honest": [i for i in range(n) if i not in bad], "attacker": bad}
    sides = {k: v for k, v in sides.items() if v}
    tokens = {k: secrets.token_hex(16) for k in sides}
    hosts = {k: [client_name(i) for i in v] for k, v in sides.items()}
    server = ServerHost(cfg, [client_name(i) for i in range(n)], tokens=tokens, hosts=hosts)
    workers: dict[str, Any] = {}
    runners: list[_AttackingRunner] = []
    records: list[dict[str, Any]] = []
    reason = ""
    try:
        address = server.start()
        for side, clients in sides.items():
            w = WorkerHost(cfg, address, side, tokens[side], clients)
            if side == "attacker":
                make = w.node.make_runner

                def wrapped(joined: Any, make: Any = make) -> Any:
                    runners.append(_AttackingRunner(make(joined), kinds, cfg.seed + 99))
                    return runners[-1]

                w.node.make_runner = wrapped
            workers[side] = w
            w.start()
        if server.wait_available(n, 60.0) < n:
            raise RuntimeError("not every client registered within 60 s")
        server.begin(0)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            event = server.next_event(2.0)
            if event is None:
                continue
            if "round" in event:
                records.append(event["round"])
                server.proceed()
            elif "done" in event:
                reason = event["done"].reason  # a RunOutcome
                break
            else:
                server.proceed()
    finally:
        for w in workers.values():
            w.stop()
        server.stop("bench over")
    acc = next((r["accuracy"] for r in reversed(records) if "accuracy" in r), None)
    return {
        "accuracy": acc,
        "reason": reason,
        "records": records,
        "sent": sum(r.sent for r in runners),
        "refused": sum(r.refused for r in runners),
    }


def _config(rounds: int, aggregator: str) -> Any:
    from fedq.config import config_from_dict

    raw: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    raw["rounds"] = {**BASE["rounds"], "count": rounds, "eval_every": rounds}
    raw["defence"] = dict(DEFENCE[aggregator])
    return config_from_dict(raw)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds, counts, attacks, aggs = args.rounds, args.attackers, args.attacks, args.aggregators
    if args.quick:
        rounds, counts, attacks = 3, [2], ["sign_flip"]
    t0 = time.perf_counter()
    clean: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for agg in aggs:
        cfg = _config(rounds, agg)
        clean[agg] = float(run_attacked(cfg, [], ATTACKS[:1])["accuracy"])
        for attack in attacks:
            for k in counts:
                # the attackers spread over the roster: clients 0, 3, 6 (k of them)
                out = run_attacked(cfg, [3 * i for i in range(k)], [attack])
                rows.append(
                    {
                        "aggregator": agg,
                        "attack": attack,
                        "attackers": k,
                        "accuracy": out["accuracy"],
                        "refused": out["refused"],
                    }
                )
    base = clean.get("mean") or next(iter(clean.values()))
    print(
        f"robust aggregation, digits, 10 clients, {rounds} rounds (same seeds); "
        f"clean mean accuracy {base:.4f}"
    )
    head = "aggregator     clean  " + "  ".join(
        f"{a}x{k:<2}".rjust(14) for a in attacks for k in counts
    )
    print(head)
    for agg in aggs:
        cells = []
        for a in attacks:
            for k in counts:
                r = next(
                    x for x in rows if (x["aggregator"], x["attack"], x["attackers"]) == (agg, a, k)
                )
                cells.append(f"{r['accuracy']:.3f} ({r['accuracy'] / base:.2f})".rjust(14))
        print(f"{agg:<13} {clean[agg]:.3f}  " + "  ".join(cells))
    print("cells: accuracy (ratio to the clean mean run)")
    return {
        "rounds": rounds,
        "clean": clean,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(),
    }
