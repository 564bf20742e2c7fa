"""A discarded or abandoned split round leaves the server's half exactly as it was when the round
opened (its top's LoRA, head and gates, the gradient codec, optimizer and gate-controller state,
the stochastic-rounding streams), although the round's steps trained it; an applied round keeps
what its steps did (tests/cli/test_outcomes.py checks it from the command line)."""

from __future__ import annotations

from typing import Any

import torch

from fedq.split.protocol import SplitClientWorker, SplitServer
from fedq.wire import WireMessage
from fedq.wire.control import Assignment


def _same(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two nested state dicts differ (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in _same(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path} length"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _same(x, y, f"{path}/{i}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _codec_streams(server: SplitServer) -> list[torch.Tensor]:
    """The stochastic-rounding generator states of the gradient codecs (cut and inner)."""
    from fedq.adapt import CutCodec

    codecs = [server.grad_q, *(m for m in server.model.top.modules() if isinstance(m, CutCodec))]
    return [q.get_extra_state()["compressor"]["rng"].clone() for q in codecs]


class _FailsAfterItsSteps:
    """A client connection that takes every step, then reports the task failed instead of
    uploading its client state (the client is dropped: the round has too few updates)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def get_task(self, round: int, client_id: str | None = None) -> WireMessage:
        return self.conn.get_task(round, client_id)

    def split_step(self, msg: WireMessage) -> WireMessage:
        return self.conn.split_step(msg)

    def push_update(self, msg: WireMessage) -> int:
        failed = WireMessage.failed(msg.client_id, msg.round, "disk full")
        return self.conn.push_update(failed)


def test_a_discarded_round_leaves_the_server_half_as_it_was(kit, open_rounds) -> None:  # type: ignore[no-untyped-def]
    cfg = kit.tiny_cfg(
        all_boundaries=True,
        local_steps=2,
        rounds={"count": 2, "num_clients": 2, "clients_per_round": 2, "min_clients": 2},
    )
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    shards = kit.shards(cfg, split, parts)
    harness = open_rounds(cfg, server, {c: sh.size for c, sh in shards.items()})
    worker = SplitClientWorker(cfg, kit.build(cfg), shards, {c: int(c[-1]) for c in shards})
    conn = harness.connection()

    def top() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in server.model.top.named_parameters()}

    start, accuracy, streams = server.state_dict(), server.evaluate(), _codec_streams(server)
    harness.engine.start()
    tasks = harness.next_task().tasks
    assert [t.client_id for t in tasks] == ["client-0", "client-1"]
    worker.run(Assignment("client-0", 0, 60.0), conn)  # all its steps and its client state
    trained = top()
    assert any(not torch.equal(trained[n], v) for n, v in start["top"].items())  # steps trained
    worker.run(Assignment("client-1", 0, 60.0), _FailsAfterItsSteps(conn))
    rec = harness.record(0)
    assert rec["applied"] is False and rec["updated"] == ["client-0"]
    assert len(rec["steps"]) == 4  # both clients took their steps: the top moved twice as far
    assert not _same(server.state_dict(), start), _same(server.state_dict(), start)
    assert all(p.grad is None for p in server.model.top.parameters())
    assert all(torch.equal(a, b) for a, b in zip(_codec_streams(server), streams, strict=True))
    assert server.evaluate() == accuracy
    assert rec["accuracy"] == accuracy["accuracy"] and rec["loss"] == accuracy["loss"]

    # the next round is applied: the top keeps what its steps did, the client state is averaged
    tasks = harness.next_task().tasks
    for t in tasks:
        worker.run(Assignment(t.client_id, 1, 60.0), conn)
    rec = harness.record(1)
    assert rec["applied"] is True and rec["updated"] == ["client-0", "client-1"]
    after = server.state_dict()
    assert _same(after["top"], start["top"]) and _same(after["client_state"], start["client_state"])
    assert after["steps"] == start["steps"] + 4


def test_a_round_open_when_the_run_stops_is_rolled_back(kit, open_rounds) -> None:  # type: ignore[no-untyped-def]
    """The run stops (Ctrl-C, workers lost) after a client's steps: the round is abandoned, and
    what the run reports at its end (bit maps, evaluation) is the last closed round's."""
    cfg = kit.tiny_cfg(
        local_steps=2,
        rounds={"count": 1, "num_clients": 2, "clients_per_round": 2, "min_clients": 2},
    )
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    shards = kit.shards(cfg, split, parts)
    harness = open_rounds(cfg, server, {c: sh.size for c, sh in shards.items()})
    worker = SplitClientWorker(cfg, kit.build(cfg), shards, {c: int(c[-1]) for c in shards})
    start, maps = server.state_dict(), server.bit_maps()
    harness.engine.start()
    harness.next_task()
    worker.run(Assignment("client-0", 0, 60.0), harness.connection())
    assert _same(server.state_dict(), start)  # trained, not yet closed
    harness.engine.stop("interrupted")
    assert harness.engine.join(30) and harness.hooks.records == []
    assert not _same(server.state_dict(), start) and server.bit_maps() == maps


def test_a_client_state_weighs_no_more_than_the_examples_declared(kit) -> None:  # type: ignore[no-untyped-def]
    """A split client's state is averaged with the weight it claims in ``num_samples``, capped at
    the examples it declared when it registered (fixed for the run): claiming a million rows
    does not let one client outweigh the others."""
    from fedq.codec import raw
    from fedq.rounds.workload import Member

    cfg = kit.tiny_cfg()
    split, _ = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    state = {k: raw(v) for k, v in server.client_state.items()}
    member = Member("client-0", 0, 64)
    honest = server.accept(
        0, member, WireMessage.update("client-0", 0, tensors=state, scalars={"num_samples": 40.0})
    )
    greedy = server.accept(
        0, member, WireMessage.update("client-0", 0, tensors=state, scalars={"num_samples": 1e6})
    )
    assert honest.weight == 40.0
    assert greedy.weight == 64.0
