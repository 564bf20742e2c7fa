"""A run-level byte budget for the cut (``split.budget_bytes``, :mod:`fedq.split.budget`) and the
fixed baseline at fractional widths: the run's bytes at the transport come to the budget, warm-up
included, whatever the batches' lengths; the fixed arm's mixed map has exactly the asked mean."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
import torch

from fedq.adapt.amaq import FixedQuantizer, spread_bits
from fedq.config import config_from_dict
from fedq.errors import ConfigError
from fedq.split.budget import CutBudget
from fedq.split.protocol import SplitServer


@pytest.mark.parametrize(("width", "bits"), [(384, 1.5), (384, 2.25), (32, 3.1), (10, 1.0)])
def test_spread_bits_mean_and_values(width: int, bits: float) -> None:
    m = spread_bits(width, bits)
    assert m.dtype == torch.uint8 and m.numel() == width
    lo = int(bits)
    assert set(m.tolist()) <= {lo, lo + 1}
    assert abs(float(m.float().mean()) - bits) <= 0.5 / width + 1e-9
    # spread evenly: every run of channels of length 1/frac holds its share of wide ones
    if bits == 1.5:
        assert m.view(-1, 2).sum(1).tolist() == [3] * (width // 2)


def test_fractional_fixed_quantizer_sends_the_mixed_map() -> None:
    x = torch.randn(4, 6, 384)
    p = FixedQuantizer(1.5).encode(x)
    assert p.bits.numel() == 384 and p.mean_bits() == pytest.approx(1.5)
    p2 = FixedQuantizer(2.0).encode(x)  # an integer width is the plain fixed codec
    assert set(p2.bits.reshape(-1).tolist()) == {2}
    with pytest.raises(ConfigError, match="per-channel"):
        FixedQuantizer(1.5, granularity="tensor")


def _link(budget: CutBudget, numels: list[int], fixed_over: float) -> list[float]:
    """Drive ``budget`` as a server would: each step sends the target it planned, at a payload
    of ``2 * numel * b / 8`` and an overhead that grows with the tokens. Returns the bits."""
    bits = []
    for n in numels:
        b = budget.target()
        bits.append(b)
        payload = 2 * n * b / 8
        budget.record(payload + fixed_over + n / 40, payload, n)
    return bits


def _cost(numels: list[int], b: float, fixed_over: float) -> float:
    return sum(2 * n * b / 8 + fixed_over + n / 40 for n in numels)


def test_budget_is_spent_to_within_a_step_whatever_the_lengths() -> None:
    rng = random.Random(0)
    numels = [384 * 32 * rng.randint(20, 64) for _ in range(200)]
    budget_bytes = _cost(numels, 2.0, 900.0)  # what fixed 2 bits would cost
    b = CutBudget(budget_bytes, 200, start_bits=4.0, warmup_steps=40, b_min=1, b_max=8)
    bits = _link(b, numels, 900.0)
    step = max(_cost([n], 8.0, 900.0) for n in numels)
    assert abs(b.spent - budget_bytes) < step
    assert bits[0] == 4.0 and bits[20] > bits[60]  # the warm-up, then the level it leaves
    assert sum(bits[40:]) / 160 < 2.0  # the warm-up's extra bits are paid for after it
    # a steady level (moving only as the lengths seen so far move), not a last-minute dive
    assert max(bits[40:170]) - min(bits[40:170]) < 0.35


def test_a_warmup_the_budget_cannot_pay_for_is_shortened() -> None:
    numels = [384 * 32 * 64] * 100
    budget_bytes = _cost(numels, 1.5, 500.0)
    b = CutBudget(budget_bytes, 100, start_bits=7.5, warmup_steps=50, b_min=1, b_max=8)
    bits = _link(b, numels, 500.0)
    assert b.warmup_steps < 50  # 50 steps from 7.5 bits would leave less than 1 bit after
    assert min(bits) >= 1.0 and b.level >= 1.0
    assert abs(b.spent - budget_bytes) < _cost(numels[:1], 8.0, 500.0)


def test_a_budget_below_the_floor_says_so(caplog: pytest.LogCaptureFixture) -> None:
    numels = [384 * 32 * 64] * 20
    b = CutBudget(_cost(numels, 0.5, 0.0), 20, start_bits=2.0, warmup_steps=0, b_min=1, b_max=8)
    with caplog.at_level(logging.WARNING, logger="fedq.split.budget"):
        bits = _link(b, numels, 0.0)
    assert "it will overspend" in caplog.text
    assert bits[1:] == [1.0] * 19 and b.level == 1.0


def test_budget_state_round_trips() -> None:
    b = CutBudget(1e6, 10, start_bits=4.0, warmup_steps=2, b_min=1, b_max=8)
    _link(b, [1000] * 3, 10.0)
    c = CutBudget(1e6, 10, start_bits=4.0, warmup_steps=2, b_min=1, b_max=8)
    c.load_state_dict(b.state_dict())
    assert c.target() == b.target() and c.spent == b.spent


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ({"budget_bytes": -1}, "must be >= 0"),
        ({"budget_bytes": 1e6, "act_codec": "fixed"}, "needs act_codec and grad_codec amaq"),
        ({"budget_bytes": 1e6, "all_boundaries": True}, "inner boundaries"),
        ({"fixed_bits": 8.5}, "fixed_bits: must be in 1..8"),
    ],
)
def test_budget_config_errors(split: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"mode": "split", "split": split})


def _transport_bytes(kit, rounds, metered, cfg) -> tuple[int, list[dict], SplitServer]:  # type: ignore[no-untyped-def]
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), split.test, 2)
    conns: list[Any] = []

    def wrap(principal: str, conn: Any) -> Any:
        conns.append(metered(conn))
        return conns[-1]

    rounds(cfg, server, kit.shards(cfg, split, parts), grpc=True, wrap=wrap)
    calls = [c for conn in conns for c in conn.calls if c["kind"] == "step"]
    return sum(c["up"] + c["down"] for c in calls), calls, server


def test_amaq_spends_a_fixed_runs_bytes_at_the_transport(kit, rounds, metered) -> None:  # type: ignore[no-untyped-def]
    """Fixed 1.5 bits (a mixed map) sets the bytes; AMAQ from 6 bits with a warm-up is given
    exactly those bytes and sends them, as the client's transport counts them, to within one
    step; the server's account is the transport's count."""
    common = {"b_min": 1, "local_steps": 4, "rounds": {"count": 3}}
    fixed = kit.tiny_cfg(act_codec="fixed", grad_codec="fixed", fixed_bits=1.5, **common)
    spent, calls, _ = _transport_bytes(kit, rounds, metered, fixed)
    assert len(calls) == 3 * 2 * 4
    for c in calls:
        assert c["msg"].tensors["h"].mean_bits() == pytest.approx(1.5)
    cfg = kit.tiny_cfg(budget_bytes=spent, init_bits=6.0, warmup_fraction=0.25, **common)
    got, calls, server = _transport_bytes(kit, rounds, metered, cfg)
    assert server.budget is not None and server.budget.spent == got  # ledger == transport
    largest = max(c["up"] + c["down"] for c in calls)
    assert abs(got - spent) < largest
    act_bits = [c["msg"].tensors["h"].mean_bits() for c in calls]
    assert act_bits[0] == pytest.approx(6.0, abs=0.1)  # the warm-up is paid for inside
    assert min(act_bits) < 1.5
    # the account is part of the server's checkpoint: a resume goes on from it
    again = SplitServer(cfg, kit.build(cfg), None, 2)
    assert again.budget is not None and again.budget.spent == 0
    again.load_state_dict(server.state_dict())
    assert again.budget.spent == got and again.budget.steps == len(calls)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_client_refuses_a_target_that_is_not_finite(kit, bad: float) -> None:  # type: ignore[no-untyped-def]
    """A hostile or broken server's ``act_target_bits`` is one clear error on the client, before
    its gates move."""
    from fedq.codec import raw
    from fedq.errors import FedqError
    from fedq.split.protocol import SplitClientWorker
    from fedq.wire.control import Assignment
    from fedq.wire.message import WireMessage

    cfg = kit.tiny_cfg(
        budget_bytes=1e6, rounds={"count": 1, "num_clients": 1, "clients_per_round": 1}
    )
    split, parts = kit.data(cfg)
    server = SplitServer(cfg, kit.build(cfg), None, 2)
    worker = SplitClientWorker(cfg, kit.build(cfg), kit.shards(cfg, split, parts), {"client-0": 0})
    gates = worker.act_q.gate.detach().clone()

    class Conn:
        def get_task(self, r: int, cid: str) -> WireMessage:
            state = {k: raw(v) for k, v in server.client_state.items()}
            return WireMessage.global_model(cid, r, state)

        def split_step(self, msg: WireMessage) -> WireMessage:
            g = raw(torch.zeros(msg.tensors["h"].shape))
            scalars = {"loss": 1.0, "act_target_bits": bad}
            return WireMessage.gradients(
                msg.client_id, msg.round, msg.step, {"g": g}, scalars=scalars
            )

    with pytest.raises(FedqError, match="act_target_bits from the server must be finite"):
        worker.run(Assignment("client-0", 0, 60.0), Conn())  # type: ignore[arg-type]
    assert torch.equal(worker.act_q.gate.detach(), gates)
