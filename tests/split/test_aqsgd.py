"""AQ-SGD baseline: both copies of each example's activation stay in step over the round protocol,
the change codes with less error than the activation, a replayed or malformed message is refused
with nothing stored, and a lost reply puts the copies back in step at the next visit."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from fedq.adapt.aqsgd import ActivationMemory, DeltaQuantizer, decode_delta
from fedq.codec import dequantize
from fedq.config import config_from_dict
from fedq.errors import ConfigError, FedqError
from fedq.rounds.workload import Member
from fedq.split.codecs import make_codec, pack_labels
from fedq.split.protocol import SplitClientWorker, SplitServer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().sum() / b.square().sum())


def test_sender_and_receiver_agree_bit_for_bit_and_the_change_codes_better() -> None:
    g = torch.Generator().manual_seed(0)
    q = DeltaQuantizer(2, quant_range="mse", row_scale=True)
    recv = ActivationMemory()
    base = torch.randn(4, 10, 32, generator=g)
    errs = []
    for visit, (ids, length) in enumerate(
        [([0, 1, 2, 3], 10), ([2, 3, 0, 1], 7), ([1, 0, 3, 2], 12)]
    ):
        x = torch.zeros(4, length, 32)
        n = min(length, 10)
        order = torch.tensor(ids)
        x[:, :n] = base[order, :n] + 0.05 * visit * torch.randn(4, n, 32, generator=g)
        x.requires_grad_(True)
        out, p, pending = q.forward_encode_delta(x, ids)
        assert pending.versions == [visit] * 4
        h, theirs = decode_delta(recv, ids, pending.versions, p, "cpu")
        assert torch.equal(out.detach(), h)  # what the server trains on, exactly
        (out * 3.0).sum().backward()  # straight-through identity
        assert x.grad is not None and torch.equal(x.grad, torch.full_like(x, 3.0))
        q.commit(pending)
        recv.commit(theirs.ids, theirs.versions, theirs.value)
        errs.append(_rel(out.detach()[:, :n], x.detach()[:, :n]))
    assert len(q.memory) == len(recv) == 4
    assert recv.versions([0, 1, 2, 3, 9]) == [3, 3, 3, 3, 0]
    # first visit: the activation itself at 2 bits; later visits: only a small change
    assert errs[1] < 0.2 * errs[0] and errs[2] < 0.2 * errs[0], errs
    # without ids it is the fixed codec (evaluation)
    x = torch.randn(2, 5, 32, generator=g)
    assert torch.equal(q(x), dequantize(q.encode(x)))


def test_repeated_ids_and_a_version_mismatch() -> None:
    q = DeltaQuantizer(4)
    x = torch.randn(3, 6, 16)
    out, _, pending = q.forward_encode_delta(x, [5, 5, 7])
    q.commit(pending)
    assert q.memory.versions([5, 7]) == [1, 1]
    m = q.memory.reference([5], [1], 6, 16)
    assert torch.equal(m[0], out[1].detach())  # the last row of a repeated id wins
    recv = ActivationMemory()  # a receiver that never saw version 1 (a lost message)
    with pytest.raises(FedqError, match="example 5 coded against version 1, this side holds 0"):
        decode_delta(recv, [5], [1], q.encode(x[:1]), "cpu")


def test_aqsgd_is_checked_in_the_config() -> None:
    raw = {
        "mode": "split",
        "split": {"grad_codec": "aqsgd", "act_codec": "aqsgd", "all_boundaries": True},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    text = "\n".join(e.value.problems)
    assert "split.grad_codec: aqsgd codes activations only" in text
    assert "not with all_boundaries" in text


def test_split_steps_over_the_wire_keep_both_copies_in_step(kit, rounds, metered) -> None:  # type: ignore[no-untyped-def]
    cfg = kit.tiny_cfg(act_codec="aqsgd", grad_codec="fixed", fixed_bits=2, local_steps=6)
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    assert type(make_codec(cfg.split, "act", 32)) is DeltaQuantizer
    conns: dict[str, Any] = {}

    def wrap(principal: str, conn: Any) -> Any:
        conns[principal] = metered(conn)
        return conns[principal]

    _, hooks, nodes = rounds(cfg, server, kit.shards(cfg, split, parts), grpc=False, wrap=wrap)
    assert [r["applied"] for r in hooks.records] == [True, True]
    for node in nodes:
        (cid,) = (c.client_id for c in node.clients)
        worker = node.runner
        assert isinstance(worker.act_q, DeltaQuantizer)
        sent = [c["msg"] for c in conns[cid].calls if c["kind"] == "step"]
        # 2 rounds of 6 steps of 8 over a 64-example partition (a new order each round): some
        # examples seen once, some twice
        for rec in hooks.records:
            assert sum(row["client"] == cid for row in rec["steps"]) == 6
        assert len(sent) == 12
        refs = torch.cat([dequantize(m.tensors["ref"]) for m in sent])
        assert float(refs.max()) >= 1 and float(refs.min()) == 0
        ids = sorted(worker.act_q.memory._m)
        mine = worker.act_q.memory
        theirs = server.act_rx.memories[cid]
        assert 48 < len(mine) == len(theirs) <= 64 and ids == sorted(theirs._m)
        for i in ids:
            assert mine._m[i][0] == theirs._m[i][0]
            assert torch.equal(mine._m[i][1], theirs._m[i][1])
        # a replayed message codes against versions the server has moved past: refused by the
        # server's decoder, nothing changes
        member = Member(cid, member_index(cid), len(parts[member_index(cid)]))
        replay = next(m for m in reversed(sent) if float(dequantize(m.tensors["ref"]).max()) >= 1)
        before = {i: theirs._m[i][0] for i in ids}
        with pytest.raises(FedqError, match="out of step"):
            server.step(1, member, replay)
        assert {i: theirs._m[i][0] for i in ids} == before
        # malformed AQ-SGD fields: clear errors, nothing stored
        msg = sent[-1]
        n = msg.tensors["h"].shape[0]
        bad_ref = dict(msg.tensors, ref=pack_labels(torch.full((n,), -100.0)))
        short = dict(msg.tensors, ids=pack_labels(torch.zeros(n - 1)))
        no_ids = {k: v for k, v in msg.tensors.items() if k != "ids"}
        for tensors, match in (
            (bad_ref, "one non-negative integer per example"),
            (short, "one non-negative integer per example"),
            (no_ids, "expected activations h/ids/labels/mask/ref"),
        ):
            with pytest.raises(FedqError, match=match):
                server.step(1, member, dataclasses.replace(msg, tensors=tensors))
        assert {i: theirs._m[i][0] for i in ids} == before and len(theirs) == len(mine)


def member_index(cid: str) -> int:
    return int(cid.rsplit("-", 1)[1])


def test_a_lost_reply_puts_the_copies_back_in_step_at_the_next_visit(kit, open_rounds) -> None:  # type: ignore[no-untyped-def]
    cfg = kit.tiny_cfg(
        act_codec="aqsgd",
        grad_codec="fixed",
        fixed_bits=2,
        local_steps=3,
        rounds={"count": 1, "num_clients": 1, "clients_per_round": 1},
    )
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    shards = kit.shards(cfg, split, parts)
    harness = open_rounds(cfg, server, {c: sh.size for c, sh in shards.items()})
    harness.engine.start()
    (task,) = harness.next_task().tasks
    assert task.client_id == "client-0"
    lose = [False]
    sent: list[Any] = []

    class Lossy:
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def split_step(self, msg):  # type: ignore[no-untyped-def]
            sent.append(msg)
            reply = self.conn.split_step(msg)  # the server has taken the step ...
            if lose[0]:
                raise ConnectionError("reply lost")  # ... but the client never hears of it
            return reply

    conn = Lossy(harness.connection())
    worker = SplitClientWorker(cfg, kit.build(cfg), shards, {"client-0": 0})
    opt = torch.optim.SGD([p for p in worker.model.bottom.parameters() if p.requires_grad], lr=0.0)
    take = parts[0][:8]
    ids = take.tolist()
    noise = torch.Generator().manual_seed(0)

    def step(i: int) -> None:
        worker.step(conn, "client-0", shards["client-0"], opt, take, 0, i, None, None, noise)

    step(0)
    theirs = server.act_rx.memories["client-0"]
    assert worker.act_q.memory.versions(ids) == theirs.versions(ids) == [1] * 8
    lose[0] = True
    with pytest.raises(ConnectionError):
        step(1)
    assert theirs.versions(ids) == [2] * 8 and worker.act_q.memory.versions(ids) == [0] * 8
    lose[0] = False
    # the engine refuses a replay of a step it has taken (the step order of the round)
    with pytest.raises(FedqError, match="out of order"):
        harness.engine.exchange(sent[1])
    assert theirs.versions(ids) == [2] * 8
    step(2)  # version 0: the server starts these examples afresh
    assert worker.act_q.memory.versions(ids) == theirs.versions(ids) == [1] * 8
    for i in ids:
        assert torch.equal(worker.act_q.memory._m[i][1], theirs._m[i][1])
