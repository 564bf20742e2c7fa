"""Plain host objects, one process each: the server (round engine + workload + gRPC) and a client
worker (a client node hosting logical clients). :mod:`fedq.runtime.backend` runs them as Ray
actors or in-process; ``fedq serve`` / ``fedq join`` run the same objects on their own.

Both build their models from the resolved config with the same seed, and a worker loads its
clients' data where it runs; nothing crosses a process boundary at run time but the round
protocol over gRPC (the driver of a simulation only starts, observes and checkpoints).
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fedq.config import RunConfig, config_from_dict
from fedq.data.datasets import Shard
from fedq.errors import FedqError
from fedq.modes import get_mode
from fedq.rounds.engine import RoundEngine
from fedq.rounds.node import Backoff, ClientNode, TaskRunner
from fedq.rounds.workload import Hooks, RunOutcome
from fedq.runtime.placement import SiteData, location
from fedq.runtime.setup import preload_optimizers, quiet_process, torch_device
from fedq.transport.keepalive import Keepalive
from fedq.transport.security import TlsConfig
from fedq.wire.control import ClientInfo, Joined
from fedq.wire.limits import WireLimits

log = logging.getLogger(__name__)


def data_shape(train: Any) -> tuple[int, int]:
    """``(num_classes, input_dim)`` of a data set (input_dim 0 for text)."""
    x = getattr(train, "x", None)
    dim = int(x.shape[1]) if x is not None and x.dim() == 2 else 0
    return int(train.num_classes), dim


def take_round_traffic(counters: Any, record: dict[str, Any]) -> dict[str, Any]:
    """Move the bytes the server's transport counted since the last round into ``record``
    (data bytes per direction; the registration and work-stream bytes as ``control_bytes``);
    returns the per-client rows."""
    traffic = counters.take()
    record.update(
        bytes_up=int(traffic["bytes_up"]),
        bytes_down=int(traffic["bytes_down"]),
        control_bytes=int(traffic["control_up"]) + int(traffic["control_down"]),
    )
    clients: dict[str, Any] = traffic["clients"]
    return clients


class _Relay:
    """The engine's hooks when a driver records the run (a simulation): each event waits in a
    queue until the driver has handled it (a round written and checkpointed, a privacy charge
    journaled) and calls :meth:`proceed`; the engine goes on only then."""

    def __init__(self) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._go = threading.Event()

    def on_start(self, info: dict[str, Any]) -> None:
        return None

    def on_open(self, r: int, ledger: dict[str, Any]) -> None:
        if ledger:  # a run with privacy: the driver journals the ledger before any release
            self._go.clear()
            self.events.put({"open": r, "ledger": ledger})
            self._go.wait()

    def on_round(self, record: dict[str, Any]) -> None:
        self._go.clear()
        self.events.put({"round": record})
        self._go.wait()

    def on_done(self, outcome: RunOutcome) -> None:
        self.events.put({"done": outcome})

    def proceed(self) -> None:
        self._go.set()


class _Counted:
    """The engine's hooks as a :class:`ServerHost` passes them on: a closed round's record first
    gets the bytes the host's transport counted in it (:func:`take_round_traffic`), and the
    host's per-client totals grow by them."""

    def __init__(self, host: ServerHost, hooks: Hooks) -> None:
        self.host = host
        self.hooks = hooks

    def on_start(self, info: dict[str, Any]) -> None:
        self.hooks.on_start(info)

    def on_open(self, r: int, ledger: dict[str, Any]) -> None:
        self.hooks.on_open(r, ledger)

    def on_round(self, record: dict[str, Any]) -> None:
        rows = take_round_traffic(self.host.transport.counters, record)
        for cid, row in rows.items():
            tot = self.host.client_traffic.setdefault(cid, {"bytes_up": 0, "bytes_down": 0})
            tot["bytes_up"] += int(row["bytes_up"])
            tot["bytes_down"] += int(row["bytes_down"])
        self.hooks.on_round(record)

    def on_done(self, outcome: RunOutcome) -> None:
        self.hooks.on_done(outcome)


class ServerHost:
    """The server of a run: the mode's workload behind a :class:`RoundEngine` and a
    :class:`~fedq.transport.TransportServer`. ``roster``: every client id, in index order;
    ``tokens`` / ``hosts``: principal -> token and principal -> the clients it may act for."""

    def __init__(
        self,
        cfg: RunConfig,
        roster: Sequence[str],
        *,
        tokens: Mapping[str, str] | None,
        hosts: Mapping[str, Sequence[str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsConfig | None = None,
        allow_insecure: bool = False,
        eval_data: str | None = None,
        hooks: Any = None,
        run_id: str | None = None,
        keepalive: Keepalive | None = None,
    ) -> None:
        quiet_process(cfg.runtime.threads_per_worker)
        from fedq.runtime.setup import pin_base
        from fedq.transport.budget import ServerLimits
        from fedq.transport.server import TransportServer

        cfg = pin_base(cfg)  # clients check their own base against it before any round
        self.mode = get_mode(cfg.mode)
        split = _load_eval(cfg, eval_data)
        num_classes, input_dim = data_shape(split.train)
        self.cfg = cfg
        device = torch_device(cfg.runtime.device)
        self.workload = self.mode.server_workload(cfg, split, num_classes, input_dim, device)
        principals = len(tokens) if tokens else len(roster)
        limits = WireLimits(chunk_size=cfg.runtime.chunk_bytes)
        budget = ServerLimits(upload_budget_bytes=cfg.runtime.upload_budget_mb << 20)
        self.transport = TransportServer(
            self,
            host=host,
            port=port,
            tokens=tokens,
            hosts=hosts,
            tls=tls,
            limits=limits,
            allow_insecure=allow_insecure,
            max_workers=4 * principals + 8,
            server_limits=budget,
            keepalive=keepalive,
        )
        #: each client's data bytes up and down as this host counted them, over its rounds
        self.client_traffic: dict[str, dict[str, int]] = {}
        #: the relay of a run whose driver records it (no ``hooks`` given), else None
        self.observer: _Relay | None = None
        if hooks is None:
            hooks = self.observer = _Relay()
        self.engine = RoundEngine(
            cfg,
            self.workload,
            roster,
            run_id=run_id or uuid.uuid4().hex[:12],
            config_json=json.dumps(cfg.to_dict()),
            num_classes=num_classes,
            input_dim=input_dim,
            hooks=_Counted(self, hooks),
            policy=self.mode.round_policy(cfg),
        )

    # the transport's handler: the engine
    def register(self, principal: str, reg: Any) -> Joined:
        return self.engine.register(principal, reg)

    def work(self, principal: str, run_id: str, closed: threading.Event) -> Any:
        return self.engine.work(principal, run_id, closed)

    def wake(self) -> None:
        self.engine.wake()

    def get_task(self, client_id: str, round: int) -> Any:
        return self.engine.get_task(client_id, round)

    def push_update(self, msg: Any) -> None:
        self.engine.push_update(msg)

    def exchange(self, msg: Any) -> Any:
        return self.engine.exchange(msg)

    # lifecycle
    def start(self) -> str:
        self.transport.start()
        return str(self.transport.address)

    def where(self) -> dict[str, Any]:
        return location()

    def info(self) -> dict[str, Any]:
        members = self.engine.available()
        sizes = {m.index: m.num_examples for m in members}
        out = self.workload.info()
        out.update(
            run_id=self.engine.run_id,
            address=self.transport.address,
            clients_available=len(members),
            client_sizes=sizes,
            privacy=self.workload.ledger.plan(sizes) if sizes else {},
        )
        return out

    def wait_available(self, n: int, timeout: float) -> int:
        return self.engine.wait_available(n, timeout)

    def begin(self, start_round: int = 0) -> None:
        self.transport.counters.take()  # registration bytes are not a round's
        self.engine.start(start_round)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next closed round (``{"round": record}``), a round's privacy charge to journal
        (``{"open": r, "ledger": ...}``) or the end (``{"done": RunOutcome}``)."""
        assert self.observer is not None, "next_event is for runs observed by a driver"
        try:
            return self.observer.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def proceed(self) -> None:
        assert self.observer is not None
        self.observer.proceed()

    def report_extras(self) -> dict[str, Any]:
        """What the mode's workload adds to the run's report at the end (:meth:`Mode.report_extras
        <fedq.modes.base.Mode.report_extras>`)."""
        return self.mode.report_extras(self.workload)

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any], journal: dict[str, Any] | None = None) -> None:
        """Resume: the engine's checkpointed state, then the privacy ledger of a later round's
        journal when there is one (fedq.runtime.checkpoint)."""
        self.engine.load_state_dict(state)
        if journal is not None:
            self.workload.ledger.load_state_dict(journal["ledger"])

    def stop_run(self, reason: str) -> None:
        """End the run (every client is told DONE with ``reason``); the host keeps serving."""
        self.engine.stop(reason)
        if self.observer is not None:
            self.observer.proceed()

    def stop(self, reason: str = "stopped") -> None:
        self.engine.stop(reason)
        if self.observer is not None:
            self.observer.proceed()
        self.engine.join(5.0)
        self.transport.stop(1.0)


def _load_eval(cfg: RunConfig, eval_data: str | None) -> Any:
    from fedq.runtime.setup import load_data

    return load_data(cfg, eval_data)


def make_runner(cfg: RunConfig, shards: Mapping[str, Shard], joined: Joined) -> TaskRunner:
    """The task runner of a client process for the run it joined (its model, its shards; with
    ``data.standardize`` each shard standardized with its own rows' statistics).

    Sets torch's threads to ``runtime.threads_per_worker``, as every simulation worker has: a
    ``fedq join`` process otherwise keeps torch's default (one per core), and a different number
    of threads may sum a batch's float32 loss in another order, so a deployment's reported
    training loss would differ in its last bits from the simulation's."""
    quiet_process(cfg.runtime.threads_per_worker)
    from fedq.runtime.setup import check_base

    check_base(cfg)
    if cfg.data.standardize:
        from fedq.data.scaling import standardize_shards

        shards = standardize_shards(shards)
    mode = get_mode(cfg.mode)
    return mode.client_runner(cfg, shards, joined, torch_device(cfg.runtime.device))


def run_config(joined: Joined) -> RunConfig:
    """The run's configuration as the server sent it (validated like a scenario)."""
    try:
        raw = json.loads(joined.config_json)
    except json.JSONDecodeError as e:
        raise FedqError(f"the server sent a configuration that is not JSON: {e}") from e
    return config_from_dict(raw)


#: How long reading a worker's counters waits for its tasks of a closed round to finish.
SETTLE_TIMEOUT_S = 30.0


class WorkerHost:
    """A simulation worker: a :class:`ClientNode` for the logical clients ``clients`` (roster
    indices), each with its partition of the run's data (or, with ``data``, of its site's own
    data, read here), as principal ``principal``."""

    def __init__(
        self,
        cfg: RunConfig,
        address: str,
        principal: str,
        token: str | None,
        clients: Sequence[int],
        tls: TlsConfig | None = None,
        data: SiteData | None = None,
    ) -> None:
        quiet_process(cfg.runtime.threads_per_worker)
        preload_optimizers()
        from fedq.rounds import client_name
        from fedq.runtime.setup import client_partitions, load_data
        from fedq.transport.client import TransportClient

        self.cfg = cfg
        if data is None:
            train = load_data(cfg).train
            parts = client_partitions(cfg, train)
            shards = Shard.local(train, {client_name(c): parts[c] for c in clients})
            del train, parts  # only this worker's rows stay
        else:
            shards = data.shards(cfg, clients)
        infos = [ClientInfo(cid, sh.size) for cid, sh in shards.items()]
        limits = WireLimits(chunk_size=cfg.runtime.chunk_bytes)
        self.conn = TransportClient(
            address,
            client_id=principal,
            token=token,
            limits=limits,
            tls=tls,
            timeout=cfg.rounds.timeout_s,
        )

        def runner(joined: Joined) -> TaskRunner:
            if data is not None:
                data.check(shards, joined)
            return make_runner(cfg, shards, joined)

        self.node = ClientNode(
            self.conn,
            infos,
            runner,
            node=f"{socket.gethostname()}/{principal}",
            backoff=Backoff(give_up_after=60.0),
        )
        self._thread: threading.Thread | None = None
        self.result: str | None = None
        self.error: str | None = None

    def start(self) -> int:
        """Register (so the server knows these clients), then follow the work stream in a
        background thread. Returns the number of clients registered."""
        self.node.register()
        self._thread = threading.Thread(target=self._run, name="fedq-node", daemon=True)
        self._thread.start()
        return len(self.node.clients)

    def _run(self) -> None:
        try:
            self.result = self.node.run()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("client node failed")

    def where(self) -> dict[str, Any]:
        return location()

    def status(self) -> dict[str, Any]:
        alive = self._thread is not None and self._thread.is_alive()
        return {"alive": alive, "result": self.result, "error": self.error, **self.node.stats}

    def counters(self, settled: int | None = None) -> dict[str, Any]:
        """This worker's byte counters since it started (not reset); with ``settled``, read once
        its tasks of rounds up to ``settled`` have finished (their replies counted)."""
        if settled is not None and not self.node.wait_idle(settled, SETTLE_TIMEOUT_S):
            log.warning(
                "a task of round %d was still running after %g s", settled, SETTLE_TIMEOUT_S
            )
        return self.conn.counters.snapshot()

    def state_dict(self) -> dict[str, Any]:
        runner = self.node.runner
        return runner.state_dict() if runner is not None else {}

    def state_changes(self, since: int) -> tuple[int, dict[str, Any]]:
        """``(mark, states)``: what changed since the ``mark`` of an earlier call (0: all), for
        a checkpoint that writes only that; a runner that cannot tell gives its whole state."""
        runner = self.node.runner
        changes = getattr(runner, "changes", None)
        if changes is not None:
            mark, states = changes(since)
            return int(mark), states
        return since + 1, self.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.node.runner is None:
            raise FedqError("load client state after start(): the runner is built on joining")
        self.node.runner.load_state_dict(state)

    def stop(self) -> None:
        self.node.stop()
        if self._thread is not None:
            self._thread.join(5.0)
        self.conn.close()
