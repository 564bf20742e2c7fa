"""AMAQ quantizer: exact wire parity, STE gradients, LSQ gate gradients, regularizer."""

from __future__ import annotations

import math

import pytest
import torch

from fedq.adapt import (
    AmaqQuantizer,
    BitSchedule,
    FixedQuantizer,
    IdentityQuantizer,
    bit_penalty,
)
from fedq.codec import dequantize
from fedq.errors import ConfigError


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 3] *= 20  # an outlier channel, as residual streams have
    return x


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_is_bit_exact_with_the_wire(per_token: bool, dtype: torch.dtype) -> None:
    q = AmaqQuantizer(8 if per_token else 16, b_min=1, b_max=8, init_bits=4.0, per_token=per_token)
    with torch.no_grad():  # a mixed bit map 1..8
        q.gate.copy_(torch.linspace(-6, 6, q.gate.numel()))
    x = _x(4, 8, 16).to(dtype).requires_grad_()
    y, p = q.forward_encode(x)
    bits = q.int_bits()
    assert len(set(bits.tolist())) >= 4
    assert torch.equal(p.bits, bits)
    assert torch.equal(y.detach(), dequantize(q.encode(x)))  # bit for bit, not approximately
    assert y.dtype == dtype


def test_ste_identity_into_input_and_lsq_gradient_into_gates() -> None:
    q = AmaqQuantizer(16, b_min=2, b_max=8, init_bits=5.0, alpha=1.5)
    x = _x(3, 5, 16).requires_grad_()
    w = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    y, p = q.forward_encode(x)
    (y * w).sum().backward()
    assert x.grad is not None and q.gate.grad is not None
    assert torch.equal(x.grad, w)  # straight-through: nothing is clipped with min-max ranges
    # LSQ by hand: dL/dQ_c = sum_i w_i (round(v_i) - v_i) * dDelta/db * db/dQ
    b = q.bits().detach()
    bh = b.round()
    xb = x.detach().movedim(-1, 0).reshape(16, -1)
    wb = w.movedim(-1, 0).reshape(16, -1)
    off, s = p.offsets.float().unsqueeze(1), p.scales.float().unsqueeze(1)
    v = (xb - off) / s
    resid = ((dequantize(p).movedim(-1, 0).reshape(16, -1) - off) / s).round() - v
    rng = s.squeeze(1) * (2**bh - 1)
    d_delta_db = -rng * math.log(2) * 2**bh / (2**bh - 1) ** 2
    sig = torch.sigmoid(q.alpha * q.gate.detach())
    db_dq = (q.b_max - q.b_min) * q.alpha * sig * (1 - sig)
    expected = (wb * resid).sum(1) * d_delta_db * db_dq
    torch.testing.assert_close(q.gate.grad, expected, rtol=1e-4, atol=1e-6)


def test_int_bits_round_and_init() -> None:
    q = AmaqQuantizer(4, b_min=1, b_max=8, init_bits=7.5)
    assert float(q.bits().detach().mean()) == pytest.approx(7.5, abs=1e-4)
    with torch.no_grad():
        q.gate.copy_(torch.tensor([-50.0, 0.0, 0.2, 50.0]))  # b = 1, 4.5, ~4.85, 8
    assert q.int_bits().tolist() == [1, 4, 5, 8]  # round (half to even at 4.5), never ceil
    with pytest.raises(ConfigError):
        AmaqQuantizer(4, b_min=4, b_max=3)


def test_fixed_group_and_identity_match_the_codec() -> None:
    x = _x(2, 6, 32).requires_grad_()
    fq = FixedQuantizer(3, granularity="group", group_size=24)
    y, p = fq.forward_encode(x)
    assert p.bits.unique().tolist() == [3] and p.layout.num_blocks == math.ceil(x.numel() / 24)
    assert torch.equal(y.detach(), dequantize(p))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    yi, pi = IdentityQuantizer().forward_encode(x)
    assert yi is x and torch.equal(dequantize(pi), x.detach())


def test_schedule_moves_target_then_holds() -> None:
    s = BitSchedule(lam=1.0, target_bits=3.0, start_bits=7.0, warmup_steps=10)
    assert [s.target_at(t) for t in (0, 5, 10, 50)] == [7.0, 5.0, 3.0, 3.0]
    q = AmaqQuantizer(8, b_min=1, b_max=8, init_bits=7.0)
    assert float(bit_penalty([q], s, 0).detach()) == 0.0  # at the start target: no pressure
    assert float(bit_penalty([q], s, 10).detach()) == pytest.approx(16.0)  # (7 - 3)^2
    assert bit_penalty([IdentityQuantizer()], s, 10) is None


def test_gates_move_to_target_while_task_loss_falls() -> None:
    """Tiny problem: regress y = x @ w* through the quantizer; the regularizer drives the mean
    transmitted bits from 7.5 to the 3-bit target while the task loss still falls."""
    torch.manual_seed(0)
    d = 16
    q = AmaqQuantizer(d, b_min=1, b_max=8, init_bits=7.5)
    lin = torch.nn.Linear(d, 1)
    w_true = torch.randn(d, 1)
    opt = torch.optim.Adam([{"params": lin.parameters(), "lr": 0.05},
                            {"params": [q.gate], "lr": 0.1}])  # fmt: skip
    sched = BitSchedule(lam=1.0, target_bits=3.0, start_bits=7.5, warmup_steps=100)
    losses, bits = [], []
    for step in range(200):
        x = torch.randn(8, 4, d)
        task = ((lin(q(x)) - x @ w_true) ** 2).mean()
        reg = bit_penalty([q], sched, step)
        assert reg is not None
        opt.zero_grad()
        (task + reg).backward()
        opt.step()
        losses.append(float(task))
        bits.append(float(q.int_bits().float().mean()))
    assert bits[0] >= 7.0
    assert bits[-1] <= 3.5  # reached the target average (within half a bit)
    assert sum(losses[-20:]) / 20 < 0.2 * sum(losses[:20]) / 20  # and still learned the task
