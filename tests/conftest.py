"""Test-wide environment: set before anything imports triton, transformers or ray."""

import os
from collections.abc import Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Every test runs with one intra-op thread: the models are small, so one thread is about as
    fast as two, and unlike two it does not slow down tenfold when other processes share the
    cores (OpenMP workers spin while waiting). Ray workers and subprocesses set their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Collect:
    """Round-engine hooks for tests: keeps each round's record with the server's bytes."""

    def __init__(self, counters: object) -> None:
        self.counters = counters
        self.records: list[dict] = []
        self.reason = ""

    def on_start(self, info: dict) -> None:
        return None

    def on_open(self, r: int, ledger: dict) -> None:
        return None

    def on_round(self, record: dict) -> None:
        from fedq.runtime.hosts import take_round_traffic

        take_round_traffic(self.counters, record)
        self.records.append(record)

    def on_done(self, outcome) -> None:
        self.outcome = outcome
        self.reason = outcome.reason


def run_rounds(
    cfg, workload, shards, *, grpc: bool, hosts=None, tokens=None, connect=None, wrap=None
):
    """Run ``cfg``'s rounds on ``workload`` with client nodes over loopback or real gRPC.

    ``shards``: client id -> Shard; ``hosts``: principal -> client ids (default: one principal
    per client); ``tokens``: principal -> token for the server (gRPC only; default: none);
    ``connect(principal, address)`` may replace the connection a principal uses;
    ``wrap(principal, conn)`` may wrap the connection it would use (loopback or gRPC). Returns
    ``(engine, hooks, nodes)`` after the run ends."""
    import json
    import threading

    from support.loopback import LoopbackConnection

    from fedq.modes import get_mode
    from fedq.rounds import client_name
    from fedq.rounds.engine import RoundEngine
    from fedq.rounds.node import ClientNode
    from fedq.runtime.hosts import data_shape, make_runner
    from fedq.transport import ByteCounter, TransportClient, TransportServer
    from fedq.wire.control import ClientInfo

    roster = [client_name(i) for i in range(cfg.rounds.num_clients)]
    hosts = hosts or {c: [c] for c in shards}
    data = next(iter(shards.values())).data
    num_classes, input_dim = data_shape(data)
    counters = ByteCounter()
    hooks = _Collect(counters)
    engine = RoundEngine(
        cfg,
        workload,
        roster,
        run_id="test-run",
        config_json=json.dumps(cfg.to_dict()),
        num_classes=num_classes,
        input_dim=input_dim,
        hooks=hooks,
        policy=get_mode(cfg.mode).round_policy(cfg),
    )
    transport = None
    if grpc:
        transport = TransportServer(
            engine, tokens=tokens, hosts=hosts, max_workers=2 * len(hosts) + 8
        )
        transport.start()
        hooks.counters = transport.counters
    nodes, threads = [], []
    for principal, cids in hosts.items():
        if connect is not None:
            conn = connect(principal, transport.address if transport else None)
        elif transport is not None:
            token = None if tokens is None else tokens[principal]
            conn = TransportClient(transport.address, client_id=principal, token=token, timeout=60)
        else:
            conn = LoopbackConnection(engine, client_id=principal, counters=counters)
        if wrap is not None:
            conn = wrap(principal, conn)
        mine = {c: shards[c] for c in cids}
        node = ClientNode(
            conn,
            [ClientInfo(c, mine[c].size) for c in cids],
            lambda joined, mine=mine: make_runner(cfg, mine, joined),
        )
        nodes.append(node)
    for node in nodes:
        node.register()
        t = threading.Thread(target=_run_node, args=(node,), daemon=True)
        t.start()
        threads.append(t)
    engine.wait_available(len(shards), 60)  # every client available: a reproducible selection
    engine.start()
    assert engine.join(600), "the round engine did not finish"
    for t in threads:
        t.join(30)
    if transport is not None:
        transport.stop(0.5)
    return engine, hooks, nodes


def _run_node(node: object) -> None:
    import contextlib

    from fedq.errors import FedqError

    with contextlib.suppress(FedqError):
        node.run()


@pytest.fixture(scope="session")
def rounds() -> object:
    """The in-process round harness (:func:`run_rounds`)."""
    return run_rounds


class Metered:
    """Wraps a client connection and keeps one row per data call (task, update, split step):
    what this end's transport counted for it (``up``, ``down``) and the message sent, if any.
    Everything else goes to the wrapped connection."""

    def __init__(self, conn: object) -> None:
        self.conn = conn
        self.calls: list[dict] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)

    def _own(self, client_id: str) -> tuple[int, int]:
        row = self.conn.counters.snapshot()["clients"].get(client_id, {})
        return int(row.get("bytes_up", 0)), int(row.get("bytes_down", 0))

    def _call(self, kind: str, client_id: str, round: int, msg: object, fn):
        up0, down0 = self._own(client_id)
        try:
            return fn()
        finally:
            up1, down1 = self._own(client_id)
            self.calls.append(
                {
                    "kind": kind,
                    "client": client_id,
                    "round": round,
                    "msg": msg,
                    "up": up1 - up0,
                    "down": down1 - down0,
                }
            )

    def get_task(self, round: int, client_id: str | None = None) -> object:
        cid = client_id or self.conn.client_id
        return self._call("task", cid, round, None, lambda: self.conn.get_task(round, client_id))

    def push_update(self, msg) -> object:
        return self._call(
            "update", msg.client_id, msg.round, msg, lambda: self.conn.push_update(msg)
        )

    def split_step(self, msg) -> object:
        return self._call("step", msg.client_id, msg.round, msg, lambda: self.conn.split_step(msg))


@pytest.fixture(scope="session")
def metered() -> type[Metered]:
    """:class:`Metered`, to wrap a principal's connection (``run_rounds(..., wrap=...)``)."""
    return Metered


class OpenRounds:
    """The round engine's real loop on ``workload``, with one principal (``site``) that registers
    ``clients`` (client id -> number of examples) and keeps its work stream open; the test plays
    the clients: it calls the engine as the transport would, or goes through :meth:`connection`.
    ``hooks.records`` are the round records."""

    def __init__(self, cfg, workload, clients: dict, *, num_classes: int = 2, input_dim: int = 0):
        import json
        import threading

        from fedq import __version__
        from fedq.modes import get_mode
        from fedq.rounds import client_name
        from fedq.rounds.engine import RoundEngine
        from fedq.transport import ByteCounter
        from fedq.wire.control import ClientInfo, Registration

        self.workload = workload
        self.counters = ByteCounter()
        self.hooks = _Collect(self.counters)
        roster = [client_name(i) for i in range(cfg.rounds.num_clients)]
        self.engine = RoundEngine(
            cfg,
            workload,
            roster,
            run_id="open",
            config_json=json.dumps({}),
            num_classes=num_classes,
            input_dim=input_dim,
            hooks=self.hooks,
            policy=get_mode(cfg.mode).round_policy(cfg),
        )
        infos = tuple(ClientInfo(c, n) for c, n in clients.items())
        self.engine.register("site", Registration(infos, fedq_version=__version__))
        self.closed = threading.Event()
        self.items = self.engine.work("site", "open", self.closed)
        assert next(self.items).action == "wait"  # the stream is open: the clients are available

    def connection(self):
        """A loopback connection of the principal (counting into ``counters``)."""
        from support.loopback import LoopbackConnection

        return LoopbackConnection(self.engine, client_id="site", counters=self.counters)

    def next_task(self):
        """The next TASK item of the work stream (WAIT items in between are skipped)."""
        while (item := next(self.items)).action != "task":
            assert item.action == "wait", item
        return item

    def record(self, n: int) -> dict:
        """The n-th round record, once the engine has closed that round."""
        import time

        end = time.monotonic() + 60
        while len(self.hooks.records) <= n and time.monotonic() < end:
            time.sleep(0.02)
        return self.hooks.records[n]

    def close(self) -> None:
        self.engine.stop("test over")
        self.closed.set()
        self.engine.join(10)


@pytest.fixture
def open_rounds() -> Iterator[object]:
    """``open_rounds(cfg, workload, clients, ...)`` -> :class:`OpenRounds`, stopped afterwards."""
    made: list[OpenRounds] = []

    def make(*args: object, **kwargs: object) -> OpenRounds:
        made.append(OpenRounds(*args, **kwargs))
        return made[-1]

    yield make
    for o in made:
        o.close()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random causal-LM directory (config.json, safetensors, tokenizer with a chat
    template), saved with ``save_pretrained``: what a user's ``hf:PATH`` holds."""
    from support.hf_models import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("hf") / "tiny-lm")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random BERT encoder directory, saved with ``save_pretrained``."""
    from support.hf_models import save_tiny_encoder

    return save_tiny_encoder(tmp_path_factory.mktemp("hf") / "tiny-encoder")
