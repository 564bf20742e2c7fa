"""AMAQ and the other cut codecs: exact wire parity, STE gradients, LSQ gate gradients, the
budget projection, the one cut-codec interface and its registry."""

from __future__ import annotations

import math

import pytest
import torch

from fedq.adapt import (
    CUT_CODECS,
    AmaqQuantizer,
    BitSchedule,
    DeltaQuantizer,
    FixedQuantizer,
    IdentityQuantizer,
    make_cut_codec,
)
from fedq.adapt.amaq import GateController, GateSignal, project_budget
from fedq.codec import dequantize
from fedq.config import CutCodecName
from fedq.errors import ConfigError, FedqError


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 3] *= 20  # an outlier channel, as residual streams have
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rng", ["minmax", "sigma", "mse"], ids=["minmax", "sigma+rows", "mse+rows"]
)
def test_fake_quant_is_bit_exact_with_the_wire(dtype: torch.dtype, rng: str) -> None:
    extra: dict = {"quant_range": rng, "row_scale": True} if rng != "minmax" else {}
    q = AmaqQuantizer(16, b_min=1, b_max=8, init_bits=4.0, **extra)
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
    q = AmaqQuantizer(16, b_min=2, b_max=8, init_bits=5.0)
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
    assert p.offsets is not None
    off, s = p.offsets.float().unsqueeze(1), p.scales.float().unsqueeze(1)
    v = (xb - off) / s
    resid = ((dequantize(p).movedim(-1, 0).reshape(16, -1) - off) / s).round() - v
    rng = s.squeeze(1) * (2**bh - 1)
    d_delta_db = -rng * math.log(2) * 2**bh / (2**bh - 1) ** 2
    sig = torch.sigmoid(q.gate.detach())
    db_dq = (q.b_max - q.b_min) * sig * (1 - sig)
    expected = (wb * resid).sum(1) * d_delta_db * db_dq
    torch.testing.assert_close(q.gate.grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("two_way", [False, True])
def test_fisher_signal_is_the_weighted_distortion_gradient(two_way: bool) -> None:
    """``signal="fisher"``: the task backward adds nothing through the LSQ path; the gates get
    the gradient of ``sum(g^2 (x_hat - x)^2)`` with ``g`` the gradient that reached x_hat, and
    the channels with larger ``g`` are pushed hardest towards more bits."""
    extra: dict = {"quant_range": "mse", "row_scale": True} if two_way else {}
    q = AmaqQuantizer(16, b_min=1, b_max=8, init_bits=3.0, signal="fisher", **extra)
    ref = AmaqQuantizer(16, b_min=1, b_max=8, init_bits=3.0, **extra)  # same gates, task signal
    x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(2)).requires_grad_()
    w = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(3))
    w[..., :4] *= 10.0  # channels 0-3 matter ten times more downstream
    y, p = q.forward_encode(x)
    assert torch.equal(y.detach(), dequantize(p))  # still the wire, bit for bit
    assert q.gate.grad is None  # nothing until the backward reaches x_hat
    (y * w).sum().backward()
    assert x.grad is not None and q.gate.grad is not None
    if not two_way:  # min-max clips nothing: the straight-through identity exactly
        assert torch.equal(x.grad, w)
    xd = x.detach()
    err = ref.forward_encode(xd)[0].float() - xd
    (want,) = torch.autograd.grad((w.square() * err.square()).sum(), [ref.gate])
    torch.testing.assert_close(q.gate.grad, want)
    assert float(q.gate.grad[:4].max()) < float(q.gate.grad[4:].min())  # more bits wanted there
    q.gate.grad = None
    with torch.no_grad():  # no backward, no gate gradient
        q(x)
    assert q.gate.grad is None
    q.quantize_gradient(w)  # a gradient quantizer keeps its relative-error proxy
    assert q.gate.grad is not None and bool(q.gate.grad.ne(0).any())


def test_two_way_scaling_keeps_the_straight_through_identity() -> None:
    """With clipped (sigma) ranges and per-token row scales the input still gets the incoming
    gradient unchanged, the gates a finite LSQ gradient, and the error is far below min-max."""
    kw: dict = {"b_min": 1, "b_max": 8, "init_bits": 2.0}
    q = AmaqQuantizer(16, quant_range="sigma", row_scale=True, **kw)
    x = _x(3, 5, 16) * torch.logspace(-4, 0, 5).view(1, 5, 1)  # tokens of very different size
    x.requires_grad_()
    w = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    y = q(x)
    (y * w).sum().backward()
    assert x.grad is not None  # identity up to float rounding of (w / r) * r
    torch.testing.assert_close(x.grad, w, rtol=1e-6, atol=0.0)
    assert q.gate.grad is not None and bool(torch.isfinite(q.gate.grad).all())
    assert float(q.gate.grad.abs().sum()) > 0
    plain = AmaqQuantizer(16, **kw)(x.detach())
    err = ((y.detach() - x.detach()) ** 2).sum(-1) / (x.detach() ** 2).sum(-1)
    err_plain = ((plain - x.detach()) ** 2).sum(-1) / (x.detach() ** 2).sum(-1)
    assert float(err.max()) < 0.5 < float(err_plain.max())


def test_int_bits_round_and_init() -> None:
    q = AmaqQuantizer(4, b_min=1, b_max=8, init_bits=7.5)
    assert float(q.bits().detach().mean()) == pytest.approx(7.5, abs=1e-4)
    with torch.no_grad():
        q.gate.copy_(torch.tensor([-50.0, 0.0, 0.2, 50.0]))  # b = 1, 4.5, ~4.85, 8
    # largest remainder: floors [1, 4, 4, 8] + round(0.5 + 0.85) = 1 extra bit, to the 0.85 channel
    assert q.int_bits().tolist() == [1, 4, 5, 8]
    with torch.no_grad():  # all gates equal at b = 1.5: half the channels get 2 bits, not all
        q.gate.fill_(math.log((0.5 / 7) / (1 - 0.5 / 7)))
    assert q.int_bits().tolist() == [2, 2, 1, 1]
    with pytest.raises(ConfigError):
        AmaqQuantizer(4, b_min=4, b_max=3)


def test_fixed_group_and_identity_match_the_codec() -> None:
    x = _x(2, 6, 32).requires_grad_()
    fq = FixedQuantizer(3, granularity="group", group_size=24)
    y, p = fq.forward_encode(x)
    assert p.bits.unique().tolist() == [3] and p.layout.num_blocks == math.ceil(x.numel() / 24)
    assert torch.equal(y.detach(), dequantize(p))
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))
    yi, pi = IdentityQuantizer().forward_encode(x)
    assert yi is x and torch.equal(dequantize(pi), x.detach())


def test_schedule_moves_target_then_holds() -> None:
    s = BitSchedule(target_bits=3.0, start_bits=7.0, warmup_steps=10)
    assert [s.target_at(t) for t in (0, 5, 10, 50)] == [7.0, 5.0, 3.0, 3.0]


def _budget_run(
    target: float,
    steps: int = 160,
    maps: list | None = None,
    signal: GateSignal = "task",
) -> tuple[list[float], list[int], float]:
    """Regress y from x through AMAQ where only channels 0-3 carry the signal; budget mode with
    the :class:`GateController`. Returns (mean bits sent per step, final bit map, final loss);
    appends each step's bit map to ``maps`` when given."""
    torch.manual_seed(0)
    d = 16
    q = AmaqQuantizer(d, b_min=1, b_max=8, init_bits=7.5, signal=signal)
    lin = torch.nn.Linear(d, 1)
    w = torch.zeros(d, 1)
    w[:4, 0] = torch.tensor([1.0, -1.5, 2.0, 1.2])
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    sched = BitSchedule(target_bits=target, start_bits=7.5, warmup_steps=steps // 2)
    ctl = GateController([[q]], sched, lr=0.03)
    sent, loss = [], 0.0
    for step in range(steps):
        x = torch.randn(8, 4, d)
        x_hat, p = q.forward_encode(x)
        task = ((lin(x_hat) - x @ w) ** 2).mean()
        opt.zero_grad()
        task.backward()
        opt.step()
        ctl.step(step)
        sent.append(p.mean_bits())
        loss = float(task)
        if maps is not None:
            maps.append(p.bits.tolist())
    return sent, [int(b) for b in q.int_bits().tolist()], loss


@pytest.mark.parametrize("gate_signal", ["task", "fisher"])
@pytest.mark.parametrize("target", [4.0, 2.0, 1.5])
def test_budget_tracks_schedule_and_gives_bits_to_the_signal_channels(
    target: float, gate_signal: GateSignal
) -> None:
    sent, bits, loss = _budget_run(target, signal=gate_signal)
    assert sent[0] >= 7.0  # starts near b_max
    # the bits actually sent follow the schedule: halfway down at a quarter of the run ...
    sched = BitSchedule(target_bits=target, start_bits=7.5, warmup_steps=80)
    for step in (20, 40, 79):
        assert sent[step] == pytest.approx(sched.target_at(step), abs=0.25), step
    assert abs(sent[-1] - target) <= 0.25  # ... and end at the target
    assert abs(sum(bits) / len(bits) - target) <= 0.25
    assert len(set(bits)) > 1  # channels differ ...
    signal, noise = bits[:4], bits[4:]
    assert min(signal) > max(noise) or sum(signal) / 4 > sum(noise) / 12 + 1  # ... by importance
    assert loss < 0.5


@pytest.mark.parametrize("signal", ["task", "fisher"])
def test_budget_amaq_beats_fixed_bits_at_the_same_average(signal: GateSignal) -> None:
    """Same problem at 2 bits on average: AMAQ's mixed map loses less than fixed 2-bit."""
    _, bits, amaq_loss = _budget_run(2.0, signal=signal)
    assert sum(bits) / len(bits) == pytest.approx(2.0, abs=0.07)
    torch.manual_seed(0)
    d, fq = 16, FixedQuantizer(2)
    lin = torch.nn.Linear(d, 1)
    w = torch.zeros(d, 1)
    w[:4, 0] = torch.tensor([1.0, -1.5, 2.0, 1.2])
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    for _ in range(160):
        x = torch.randn(8, 4, d)
        task = ((lin(fq(x)) - x @ w) ** 2).mean()
        opt.zero_grad()
        task.backward()
        opt.step()
    assert amaq_loss < 0.5 * float(task)


def test_projection_hits_target_and_keeps_gate_order() -> None:
    q1 = AmaqQuantizer(8, b_min=1, b_max=8, init_bits=6.0)
    q2 = AmaqQuantizer(24, b_min=1, b_max=8, init_bits=6.0)
    with torch.no_grad():
        q1.gate.copy_(torch.linspace(-2, 3, 8))
        q2.gate.copy_(torch.linspace(-1, 1, 24))
    order = torch.argsort(torch.cat([q1.gate, q2.gate]).detach())
    project_budget([q1, q2], 2.5)
    b = torch.cat([q1.bits(), q2.bits()]).detach()
    assert float(b.mean()) == pytest.approx(2.5, abs=1e-4)
    assert torch.equal(torch.argsort(torch.cat([q1.gate, q2.gate]).detach()), order)
    sent = torch.cat([q1.int_bits(), q2.int_bits()]).float()
    assert abs(float(sent.mean()) - 2.5) <= 1.0 / 8  # largest remainder per quantizer


@pytest.mark.parametrize("kind", ["fixed", "amaq"])
def test_stochastic_gradient_rounding_is_unbiased_seeded_and_wire_exact(kind: str) -> None:
    """``stochastic=True`` (the gradient direction's rounding): E[g_hat] = g, where nearest is
    biased; the same seed gives the same codes; fake-quant still equals the wire bit for bit."""

    def make(seed: int, stochastic: bool = True) -> FixedQuantizer | AmaqQuantizer:
        if kind == "fixed":
            return FixedQuantizer(2, scale_dtype="float32", stochastic=stochastic, seed=seed)
        return AmaqQuantizer(
            16,
            b_min=1,
            b_max=8,
            init_bits=2.0,
            scale_dtype="float32",
            stochastic=stochastic,
            seed=seed,
        )

    g = _x(4, 8, 16) * 1e-4
    q = make(0)
    draws = torch.stack([q.quantize_gradient(g)[0] for _ in range(400)])
    near = make(0, stochastic=False).quantize_gradient(g)[0]
    bias_sr = float((draws.mean(0) - g).abs().mean())
    bias_rn = float((near - g).abs().mean())
    assert bias_sr < 0.25 * bias_rn
    a, b = make(7), make(7)
    assert torch.equal(a.encode(g).payload, b.encode(g).payload)
    assert not torch.equal(make(8).encode(g).payload, make(7).encode(g).payload)
    fq, p = make(3).forward_encode(g)
    assert torch.equal(fq, dequantize(p))


def test_registry_holds_exactly_the_configurable_codecs_with_per_direction_settings() -> None:
    """The config's codec names and the registry agree; the registry fixes the per-direction
    settings: stochastic rounding and float32 scales for gradients only, outlier rows and float16
    scales for activations, row scales both ways; aqsgd codes activations only."""
    assert set(CUT_CODECS) == set(CutCodecName.__args__)  # type: ignore[attr-defined]
    for name in ("fixed", "amaq"):
        act = make_cut_codec(name, "act", width=16, outlier_ratio=3.0)
        grad = make_cut_codec(name, "grad", width=16, seed=5, outlier_ratio=3.0)
        assert isinstance(act, (FixedQuantizer, AmaqQuantizer))
        assert isinstance(grad, (FixedQuantizer, AmaqQuantizer))
        assert not act.spec.stochastic and grad.spec.stochastic
        assert (act.spec.scale_dtype, grad.spec.scale_dtype) == ("float16", "float32")
        assert (act.spec.outlier_ratio, grad.spec.outlier_ratio) == (3.0, 0.0)
        assert act.spec.row_scale and grad.spec.row_scale
    assert isinstance(make_cut_codec("aqsgd", "act", width=16), DeltaQuantizer)
    with pytest.raises(ConfigError, match="cannot code direction 'grad'"):
        make_cut_codec("aqsgd", "grad", width=16)
    with pytest.raises(ConfigError, match="unknown cut codec 'zip'"):
        make_cut_codec("zip", "act", width=16)


@pytest.mark.parametrize("name", ["amaq", "fixed", "none"])
def test_send_and_receive_through_the_one_interface(name: str) -> None:
    """``send`` gives the value the receiver decodes (activations with the training path,
    gradients with their relative error); the stateless receiver rejects non-finite input."""
    x = _x(2, 6, 16).requires_grad_()
    act = make_cut_codec(name, "act", width=16)
    coded = act.send(x)
    assert set(coded.tensors) == {"h"} and coded.value.requires_grad
    rx = CUT_CODECS[name].receiver("act")
    assert rx.wire_names == {"h"}
    got = rx.receive(coded.tensors, "client-0", "cpu").value
    assert torch.equal(got, coded.value.detach().float())
    grad = make_cut_codec(name, "grad", width=16, seed=1)
    g = grad.send(_x(2, 6, 16, seed=3) * 1e-3)
    assert set(g.tensors) == {"g"} and g.stats["rel_err"] >= 0.0
    assert torch.equal(
        CUT_CODECS[name].receiver("grad").receive(g.tensors, "s", "cpu").value, g.value.float()
    )
    bad = {"h": IdentityQuantizer().encode(torch.full((2, 6, 16), float("nan")))}
    with pytest.raises(FedqError, match="NaN"):
        rx.receive(bad, "client-0", "cpu")


def test_codec_state_dict_carries_gates_and_the_rounding_generator() -> None:
    """A codec's ``state_dict`` is its whole checkpoint: a fresh codec loaded from it sends the
    same bytes next, stochastic rounding included."""
    a = make_cut_codec("amaq", "grad", width=16, seed=3, b_min=1, init_bits=3.0)
    g = _x(2, 6, 16) * 1e-3
    a.send(g)  # advance the generator and accumulate a gate gradient
    with torch.no_grad():
        a.gate.add_(torch.linspace(-1, 1, 16))
    b = make_cut_codec("amaq", "grad", width=16, seed=99, b_min=1, init_bits=3.0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.int_bits(), b.int_bits())
    assert torch.equal(a.send(g).tensors["g"].payload, b.send(g).tensors["g"].payload)


@pytest.mark.parametrize("two_way", [False, True], ids=["minmax", "sigma+rows"])
@pytest.mark.parametrize("kind", ["amaq", "fixed"])
def test_outlier_rows_fake_quant_is_the_wire_and_passes_gradients_straight(
    two_way: bool, kind: str
) -> None:
    """Tokens sent as float16 outlier rows: the fake-quant value is still exactly what the
    receiver decodes, the input gradient is the identity, and those rows add nothing to the
    gates' LSQ gradient (changing them leaves it unchanged)."""
    extra: dict = {"quant_range": "sigma", "row_scale": True} if two_way else {}
    x = _x(4, 8, 16)
    x[:, 0] *= 40.0  # attention-sink tokens
    w = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(1))

    def run(x: torch.Tensor) -> tuple:
        if kind == "amaq":
            q: torch.nn.Module = AmaqQuantizer(
                16, b_min=1, b_max=8, init_bits=3.0, outlier_ratio=3.0, **extra
            )
            with torch.no_grad():
                q.gate.copy_(torch.linspace(-3, 3, 16))
        else:
            q = FixedQuantizer(3, outlier_ratio=3.0, **extra)
        xg = x.clone().requires_grad_()
        y, p = q.forward_encode(xg)
        (y * w).sum().backward()
        return y.detach(), p, xg.grad, getattr(q, "gate", None), q

    y, p, xgrad, gate, q = run(x)
    assert p.outlier_index is not None and p.outlier_index.tolist() == [0, 8, 16, 24]
    assert torch.equal(y, dequantize(q.encode(x)))
    assert torch.equal(y[:, 0], x[:, 0].half().float())
    torch.testing.assert_close(xgrad, w, rtol=1e-6, atol=0.0)
    if gate is not None:
        assert gate.grad is not None and float(gate.grad.abs().sum()) > 0
        x2 = x.clone()
        x2[:, 0] *= 1.5  # still outliers; the coded rows (and their LSQ terms) are unchanged
        _, p2, _, gate2, _ = run(x2)
        assert torch.equal(p2.payload, p.payload)
        torch.testing.assert_close(gate2.grad, gate.grad, rtol=1e-5, atol=1e-7)
