"""``fedq simulate``: a whole run on one machine (or a Ray cluster), every tensor over real gRPC,
on exactly the protocol of ``fedq serve`` / ``fedq join``.

The driver only starts, observes and checkpoints: it spawns a server host (the round engine, the
mode's workload, a gRPC server) and K worker hosts, each a client node registering its share of
the N logical clients (client ``c`` on worker ``c % K``, or as ``runtime.sites`` says, so its
state stays put) and pulling its work from the server like any ``fedq join``. The server runs
the rounds; after each one the driver writes the record and a checkpoint (server state, and the
client states that changed in the round: :class:`~fedq.runtime.checkpoint.ClientStateLog`)
before the server opens the next, so ``--resume`` continues exactly where a run stopped; a first
checkpoint (next round 0) is written as soon as the server runs, so a run killed before its
first round ended resumes too.

Before any host starts, the hosts are reserved where :mod:`fedq.runtime.placement` says. On a
cluster the server listens on its node's address, with TLS from credentials the driver makes for
the run in memory and hands to the hosts as actor arguments; on one machine it listens on
loopback (TLS only with ``runtime.tls: always``).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedq.config import RunConfig
from fedq.errors import FedqError
from fedq.modes import get_mode
from fedq.rounds import client_name
from fedq.runtime.backend import make_backend, stop_all
from fedq.runtime.checkpoint import ClientStateLog, load_checkpoint
from fedq.runtime.hosts import ServerHost, WorkerHost
from fedq.runtime.placement import HostPlan, compact, plan_hosts, reserve_hosts
from fedq.runtime.preflight import preflight
from fedq.runtime.recorder import RoundLog, RunRecorder
from fedq.transport.certs import make_run_credentials

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]

#: How long the driver waits for every worker to register before giving up.
REGISTER_TIMEOUT_S = 300.0
#: How often the driver checks that its workers are alive (between round events).
WORKER_CHECK_S = 5.0


def num_workers(cfg: RunConfig, cpus: int | None = None) -> int:
    """K: ``runtime.workers``, else one per core (``cpus``: of the cluster attached to)."""
    k = cfg.runtime.workers or cpus or os.cpu_count() or 1
    return max(1, min(k, cfg.rounds.num_clients))


def simulate(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    on_start: Callback | None = None,
    on_round: Callback | None = None,
) -> dict[str, Any]:
    """Run ``cfg``; write the run folder (:mod:`fedq.runtime.recorder`). With ``resume`` the run
    continues after the last checkpointed round of ``out_dir`` (model, strategy, codec, client
    and privacy state restored, never reset)."""
    preflight(cfg)  # names and data problems: one ConfigError before any host starts
    return Simulation(cfg, Path(out_dir), resume=resume).run(on_start, on_round)


class Simulation:
    """The driver of one simulated run (module docstring): what it planned (the hosts, their
    clients and tokens), the hosts it started, and what it learnt while the run went on (the
    workers lost, the bytes they counted, each worker's state mark at the last checkpoint).

    :meth:`run` starts the hosts, then relays the server's round events into the run's
    :class:`~fedq.runtime.recorder.RoundLog` (the same hooks ``fedq serve`` gives its engine),
    whose checkpoint is :meth:`_checkpoint`; each event is released (``proceed``) once handled."""

    def __init__(self, cfg: RunConfig, out: Path, *, resume: bool = False) -> None:
        t0 = time.perf_counter()
        self.cfg = cfg
        self.out = out
        self.ckpt = load_checkpoint(out) if resume else None
        ckpt = self.ckpt
        self.start_round = int(ckpt["next_round"]) if ckpt is not None else 0
        wall = float(ckpt.get("wall_seconds", 0.0)) if ckpt is not None else 0.0  # earlier runs
        self.backend = make_backend(cfg.runtime)
        try:  # a placement the cluster cannot take: one ConfigError before any host starts
            self.plan = plan_hosts(cfg, num_workers(cfg, self.backend.cluster_cpus()))
            self.nodes = reserve_hosts(self.backend, self.plan, cfg.runtime)
            self.recorder = RunRecorder(
                out,
                cfg,
                resume_round=self.start_round if ckpt is not None else None,
                last_round=ckpt and ckpt.get("log"),
                t0=t0,
                wall_before=wall,
            )
        except BaseException:
            self.backend.shutdown()
            raise
        self.mode = get_mode(cfg.mode)
        self.roster = [client_name(i) for i in range(cfg.rounds.num_clients)]
        #: worker principal -> its clients (roster indices), in worker order
        self.shares = {h.principal: list(h.clients) for h in self.plan[1:]}
        self.principals = list(self.shares)
        self.server: Any = None
        self.workers: list[Any] = []
        self.lost: dict[str, str] = {}  # worker principal -> why it was lost
        self.placement: dict[str, Any] = {}  # where each host runs (summary.json, start line)
        self.states = (
            ClientStateLog(out)
            if ckpt is None
            else ClientStateLog(out, ckpt.get("client_segments", ()), ckpt["clients"])
        )
        self.marks: dict[str, int] = {}  # worker principal -> its state mark at the last checkpoint
        # Bytes the clients counted: the runs before a resume (from the checkpoint) plus, per
        # worker, its counters as last read (a worker that dies keeps what it counted until then).
        self.bytes_before = (
            _zero_bytes() if ckpt is None else dict(ckpt.get("client_bytes", _zero_bytes()))
        )
        self.seen: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ the server, remotely
    def _server(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call the server host's ``method`` (an actor on Ray) and wait for its answer."""
        return self.backend.get([self.backend.call(self.server, method, *args)], timeout)[0]

    # ------------------------------------------------------------------ the run
    def run(self, on_start: Callback | None = None, on_round: Callback | None = None) -> dict:
        """Start the hosts, run every round, stop the hosts, write the summary; returns it."""
        cfg, backend = self.cfg, self.backend
        log_ = RoundLog(self.recorder, self._checkpoint, on_round)
        interrupted = False
        report_extras: dict[str, Any] = {}  # the mode's, from the server at the end
        try:
            self._start()
            info = self._server("info")
            info.update(
                workers=len(self.plan) - 1,
                backend=backend.name,
                start_round=self.start_round,
                startup_seconds=round(time.perf_counter() - self.recorder.t0, 2),
                placement=self.placement,
            )
            self.recorder.trainable_params = int(info["trainable_params"])
            log.info("run started: %s", info)
            if on_start:
                on_start(info)
            self._server("begin", self.start_round)
            log_.begin()
            self._follow(log_)
            report_extras = self._server("report_extras")
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: stopping Ray and gRPC, keeping metrics of finished rounds")
        finally:
            self._stop_hosts()
        extra: dict[str, Any] = {
            "interrupted": interrupted,
            "name": cfg.name,
            "mode": cfg.mode,
            "stopped_reason": None if log_.outcome is None else log_.outcome.stopped_reason,
            "privacy": info_privacy(cfg),
            "workers_lost": self.lost,
            "placement": self.placement,
            **_add_bytes(self.bytes_before, *self.seen.values()),
        }
        return self.recorder.finish(extra, report_extras)

    def _start(self) -> None:
        """Spawn the server and the workers where the plan says, with the run's tokens and (on a
        cluster, or with ``runtime.tls: always``) TLS credentials made here; wait until every
        client registered; restore a resumed run's state."""
        cfg, backend, plan, ckpt = self.cfg, self.backend, self.plan, self.ckpt
        n = cfg.rounds.num_clients
        tokens = {p: secrets.token_urlsafe(24) for p in self.shares}
        hosts = {p: [client_name(c) for c in cs] for p, cs in self.shares.items()}
        # On a cluster the server listens on its node's address, and every host's traffic is
        # TLS with credentials made here for this run and handed over as actor arguments.
        listen = str(self.nodes[0]["node_ip"]) if backend.attached else "127.0.0.1"
        creds = None
        if backend.attached or cfg.runtime.tls == "always":
            creds = make_run_credentials(sorted({listen, "127.0.0.1"}))
        run_id = None if ckpt is None else str(ckpt["server"]["run_id"])
        self.server = backend.spawn_at(
            0,
            plan[0].ask,
            ServerHost,
            cfg,
            self.roster,
            tokens=tokens,
            hosts=hosts,
            run_id=run_id,
            host=listen,
            tls=creds.server_tls() if creds else None,
        )
        address = self._server("start")
        if ckpt is None:  # resumable from here on: round 0 with this run id and model
            self._first_checkpoint()
        client_tls = creds.client_tls() if creds else None
        self.workers = [
            backend.spawn_at(
                i,
                h.ask,
                WorkerHost,
                cfg,
                address,
                h.principal,
                tokens[h.principal],
                list(h.clients),
                tls=client_tls,
                data=h.data,
            )
            for i, h in enumerate(plan)
            if i
        ]
        _start_workers(backend, self.workers, plan[1:], self.nodes[1:], self.lost)
        self.placement = _placement(
            backend, self.server, self.workers, plan, cfg, address, creds is not None
        )
        ready = self._server("wait_available", n, REGISTER_TIMEOUT_S)
        if ready < n:
            raise FedqError(f"only {ready} of {n} clients registered within {REGISTER_TIMEOUT_S} s")
        if ckpt is not None:
            self._restore(ckpt)

    def _follow(self, log_: RoundLog) -> None:
        """Relay the server's events into ``log_`` until the run ends, checking between events
        that the workers are alive."""
        checked = time.perf_counter()
        while True:
            event = self._server("next_event", 2.0)
            if event is not None and "done" in event:  # before any liveness check: workers
                log_.on_done(event["done"])  # that were told the run is over have ended
                return
            if event is None or time.perf_counter() - checked > WORKER_CHECK_S:
                checked = time.perf_counter()
                self._check_workers()  # then the event
            if event is None:
                continue
            if "open" in event:  # privacy charged for a round: journal it before any release
                log_.on_open(int(event["open"]), event["ledger"])
            else:  # a closed round: recorded and checkpointed (self._checkpoint)
                log_.on_round(event["round"])
            self._server("proceed")

    def _stop_hosts(self) -> None:
        backend = self.backend
        for w, p in zip(self.workers, self.principals, strict=False):
            if p in self.lost:
                continue
            try:
                backend.get([backend.call(w, "stop")])
            except Exception as e:  # a dead worker must not hide the run's own outcome
                log.warning("worker stop failed: %s", e)
        self._read_bytes()
        stop_all(backend, self.server)

    # ------------------------------------------------------------------ workers
    def _read_bytes(self, settled: int | None = None) -> None:
        """Read the live workers' byte counters (totals since they started) into ``seen``; with
        ``settled``, each once its tasks of that round have finished."""
        backend = self.backend
        for w, p in zip(self.workers, self.principals, strict=False):
            if p in self.lost:
                continue
            try:
                c = backend.get([backend.call(w, "counters", settled)], timeout=60.0)[0]
            except Exception as e:  # found dead at the next liveness check
                log.warning("%s: could not read its byte counters: %s", p, e)
                continue
            self.seen[p] = {
                "client_bytes_up": int(c["bytes_up"]),
                "client_bytes_down": int(c["bytes_down"]),
            }

    def _check_workers(self) -> bool:
        """Find workers that died since the last check (their clients leave the run: the server
        drops them from an open round as their work stream closes); report each with its clients
        and why. When too few clients remain for a round, stop the run with the reason. Returns
        True when something was lost."""
        backend, shares, lost, cfg = self.backend, self.shares, self.lost, self.cfg
        found = False
        for w, p in zip(self.workers, shares, strict=True):
            if p in lost:
                continue
            try:
                status = backend.get([backend.call(w, "status")], timeout=30.0)[0]
                why = (
                    None if status["alive"] else status["error"] or status["result"] or "it stopped"
                )
            except Exception as e:  # the actor process is gone (Ray raises an actor error)
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if why is None:
                continue
            found = True
            lost[p] = why
            clients = ", ".join(client_name(c) for c in shares[p][:5])
            more = f" and {len(shares[p]) - 5:,} more" if len(shares[p]) > 5 else ""
            log.error("%s died (clients %s%s): %s", p, clients, more, why)
        left = sum(len(c) for p, c in shares.items() if p not in lost)
        if found and left < cfg.rounds.min_clients:
            reason = (
                f"{len(lost)} worker(s) lost ({', '.join(sorted(lost))}); {left} clients left, "
                f"a round needs rounds.min_clients={cfg.rounds.min_clients}"
            )
            self._server("stop_run", reason)
        return found

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, next_round: int) -> None:
        """The checkpoint after round ``next_round - 1`` (the RoundLog's): the server's state and
        the client states that changed since the last one (``marks``: each worker's mark then);
        a lost worker's clients keep their last checkpointed state. First the workers' liveness,
        and the live workers' byte counters once their tasks of the round have finished."""
        self._check_workers()
        self._read_bytes(settled=next_round - 1)
        backend = self.backend
        server_state = self._server("state_dict")
        alive = [
            (w, p) for w, p in zip(self.workers, self.principals, strict=True) if p not in self.lost
        ]
        answers = backend.get(
            [backend.call(w, "state_changes", self.marks.get(p, 0)) for w, p in alive]
        )
        changed = self.mode.merge_client_states([a[1] for a in answers], [p for _, p in alive])
        segments = self.states.append(next_round, changed)
        self.recorder.checkpoint(
            {
                "next_round": next_round,
                "server": server_state,
                "client_segments": segments,
                "client_bytes": _add_bytes(self.bytes_before, *self.seen.values()),
            }
        )
        self.states.prune()
        self.marks.update({p: int(a[0]) for (_, p), a in zip(alive, answers, strict=True)})

    def _first_checkpoint(self) -> None:
        """The checkpoint of a run that has not run a round yet (next round 0: the run id, roster
        and initial model), so a run killed before its first round ends can be resumed."""
        state = self._server("state_dict")
        self.recorder.checkpoint(
            {"next_round": 0, "server": state, "client_segments": [], "client_bytes": _zero_bytes()}
        )

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self._server("load_state_dict", ckpt["server"], ckpt["ledger_journal"])
        clients = ckpt["clients"]
        calls = [
            self.backend.call(w, "load_state_dict", self.mode.client_state_of(clients, p))
            for w, p in zip(self.workers, self.principals, strict=True)
        ]
        self.backend.get(calls)
        log.info("resumed at round %d", ckpt["next_round"])


def _start_workers(
    backend: Any,
    workers: list[Any],
    plan: list[HostPlan],
    nodes: list[dict[str, Any]],
    lost: dict[str, str],
) -> None:
    """Register every worker's clients; a worker that cannot start (say, its site's data is not
    on its node) is a FedqError naming it, its node and why (and it counts as lost)."""
    calls = [backend.call(w, "start") for w in workers]
    for call, h, node in zip(calls, plan, nodes, strict=True):
        try:
            backend.get([call])
        except Exception as e:  # Ray's error of a failed actor: its last line says why
            lost[h.principal] = f"{type(e).__name__} at start"
            if isinstance(e, FedqError):
                raise
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            where = f" on {node['node_ip']} ({node['hostname']})" if node["node_ip"] else ""
            site = "" if h.site is None else f" (runtime.sites[{h.site}])"
            raise FedqError(
                f"{h.principal}{site}{where} could not start: "
                f"{lines[-1] if lines else type(e).__name__}"
            ) from e


def _placement(
    backend: Any,
    server: Any,
    workers: list[Any],
    plan: list[HostPlan],
    cfg: RunConfig,
    address: str,
    tls: bool,
) -> dict[str, Any]:
    """Where each host runs, as the hosts themselves report it (for summary.json and the
    console): the server's node and address, and per worker its node and its clients."""
    where = backend.get([backend.call(h, "where") for h in [server, *workers]])
    rt = cfg.runtime
    out: dict[str, Any] = {
        "backend": backend.name,
        "cluster": backend.attached,
        "strategy": rt.placement if backend.name == "ray" else None,
        "address": address,
        "tls": tls,
        "server": {**where[0], "resource": rt.server_resource},
        "workers": {},
    }
    for h, w in zip(plan[1:], where[1:], strict=True):
        site = None if h.site is None else rt.sites[h.site]
        out["workers"][h.principal] = {
            **w,
            "clients": compact(h.clients),
            "num_clients": len(h.clients),
            "site": h.site,
            "resource": site.resource if site else None,
            "data": site.data if site else None,
        }
    return out


def _zero_bytes() -> dict[str, int]:
    return {"client_bytes_up": 0, "client_bytes_down": 0}


def _add_bytes(*parts: dict[str, int]) -> dict[str, int]:
    total = _zero_bytes()
    for part in parts:
        for k in total:
            total[k] += int(part.get(k, 0))
    return total


def info_privacy(cfg: RunConfig) -> dict[str, Any]:
    p = cfg.privacy
    return {"mechanism": p.mechanism, "target_epsilon": p.target_epsilon, "delta": p.delta}
