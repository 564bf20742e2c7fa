"""AMAQ: learned per-channel bit-widths for split-learning activations and gradients.

Song et al., "AMAQ: Adaptive Mixed-bit Activation Quantization for Collaborative PEFT"
(arXiv 2510.05468; ALGORITHMS.md §1). Every quantizer here has one interface (``forward`` =
fake-quantize with a training signal, ``encode`` = what goes on the wire, ``int_bits`` = the bit
map, ``bit_loss`` = its regularizer), so the split runtime treats AMAQ, the fixed-bit "QAT-Group"
baseline (§1.7) and the identity parity reference the same way.

Design choices. Everything below the abstract of the paper is not retrievable, so each of these is
our own inference ([I] in ALGORITHMS.md §0) and is named so it can be ablated:

- [I] **Gate** (§1.3): ``b_c = b_min + (b_max - b_min) * sigmoid(alpha * Q_c)``, one gate per
  channel (last dim of ``[B, T, d]``) or, with ``per_token``, per token position (axis -2).
  ``Q`` is initialised so that ``b = init_bits`` (near ``b_max``: training starts at 6-8 bits,
  §1.5). ``alpha`` scales both the sigmoid's slope and, through it, every gradient into ``Q``.
- [I] **Range** (§1.3 item 1): asymmetric per channel over the ``B*T`` tokens of the
  micro-batch, exactly as :func:`fedq.codec.quantize` does it (float16 offset rounded down, scale
  rounded up). ``quant_range="minmax"`` (the quantizers' default) clips nothing;
  ``"sigma"`` clips each channel to ``mean +- k_b std`` for its *own* integer width ``b`` (the
  Gaussian-optimal uniform quantizer, :data:`fedq.codec.quantize.SIGMA_CLIP`), so a channel that
  AMAQ pushes to 1-2 bits gets the range that suits 1-2 bits; ``"mse"`` (the split runtime's
  default, ``split.quant_range``) picks per channel, again for its own width, the least-error
  range among ``mean +- f k_b std`` (``f`` 1 to 3) and min-max, since heavy-tailed channels
  (SmolLM2's residual stream) want wider ranges than a Gaussian's, the more so the more bits.
  ``row_scale=True`` (``split.row_scale``, default there) also divides each token's vector by
  its RMS first (two-way scaling, one fp16 per token on the wire). Either way the
  straight-through gradient into the sender's layers is the identity everywhere, clipped values
  included (§1.3 item 4; the usual STE, not LSQ's zero outside the range), and the fake-quant
  value stays bit-identical to what the receiver decodes. Why: min-max wastes the levels of a 1-3
  bit channel on its extremes and one scale per channel cannot follow gradients whose per-token
  size varies 20x; with both options 2-bit relative error at a MiniLM cut falls from 0.39 / 3.1
  (activations / gradients) to 0.16 / 0.19, and AMAQ-2 gains more from it than fixed 2-bit
  (BENCHMARKS.md, "Split learning").
- [I] **Outlier rows** (``outlier_ratio``; ``split.act_outlier_ratio``, 3 by default there):
  tokens whose vector is far larger than the median token's (the attention-sink "massive
  activations" of pre-norm causal LMs) go as float16 rows beside the codes
  (:mod:`fedq.codec.quantize`); their fake-quant value is that float16 row, their gradient the
  straight-through identity, and they add no LSQ term to the gates (no bits are spent on them).
- [I] **Integer bits** (§1.3 item 2): *largest-remainder rounding* of the continuous bits of one
  quantizer: every channel gets ``floor(b_c)`` and the ``round(sum_c b_c) - sum_c floor(b_c)``
  channels with the largest fractional parts get one bit more (ties: lower index). So the sum of
  the transmitted bits is ``round(sum_c b_c)``: the mean sent bits equal the mean continuous bits
  to within ``0.5 / C``, which plain ``round`` does not guarantee (with all gates equal at
  ``b = 1.5``, ``round`` sends 2 bits everywhere) and ``ceil`` over-delivers by ~0.5 bit. Both
  directions use a straight-through estimator (``d b_hat / d b = 1``).
- [I] **Task loss into Q** (§1.3 item 3): LSQ-style. ``Delta(b) = range / (2^b - 1)`` is a
  differentiable function of the (STE-rounded) bits and ``d x_hat / d Delta = round(v) - v`` with
  ``v = (x - offset) / Delta`` (Esser et al. 2020). Chosen over FracBits interpolation because the
  forward value then *is* the transmitted tensor at the integer bits (one quantizer evaluation per
  forward, no training/inference mismatch, nothing interpolated that the receiver never sees).
  The forward is computed by the codec itself, ``dequantize(quantize(x))``, and the surrogate only
  adds ``s - s.detach()`` (exactly zero), so fake-quant equals ``dequantize(encode(x))`` **bit for
  bit** (tested).
- [I] **Gate signal** (``signal``; split key ``act_gate_signal``): what the activation gates
  learn from. ``"task"``: the task loss through the LSQ step size, as above. ``"fisher"``: the
  Fisher-weighted distortion ``sum_i g_i^2 (x_hat_i - x_i)^2``, ``g = dL/dx_hat`` being the
  gradient that comes back (at the cut: the decoded gradient the server sent), taken through the
  same LSQ path by a hook on ``x_hat`` when the backward reaches it; the task backward then adds
  nothing to the gates. Why: to second order the loss the coding costs is
  ``1/2 sum_i H_ii e_i^2`` (``e = x_hat - x``), and the LSQ gradient of the task loss estimates
  that with a first-order term ``sum_i g_i * (round(v_i) - v_i)`` on top, zero on average but
  not per step; with the empirical Fisher ``g_i^2`` for ``H_ii`` (as HAWQ-V2 and BRECQ weight
  quantization error by curvature) every term of the proxy's gradient has the same sign, so
  a channel's importance shows without the rounding noise. Measured (BENCHMARKS.md, "Split
  learning"): SmolLM2 AMAQ-3 perplexity 90.4 against 90.9 with the task signal (9 seeds; below
  fixed-3 on 8 of 9), level at MiniLM 2 and 4 bits and SmolLM2 4 bits, worse at MiniLM 1.5
  bits (77.1 vs 79.0) and with all boundaries quantized (74.5 vs 75.8), where 1-bit errors are
  too large for a second-order estimate. So ``"task"`` stays the default.
- [I] **Gradient direction** (§1.6): the gradient ``dL/dX`` has its own gates (statistics differ
  from activations), held by the party that sends it (the server). The task loss has no
  differentiable path into those gates, so they are trained on a distortion proxy, the relative
  quantization error ``||g_hat - g||^2 / ||g||^2`` (LSQ path again), under the same budget.
  Gradients are tiny (the loss is a batch mean), so the gradient direction defaults to float32
  scales: float16 would flush their steps to subnormals.
- [I] **Stochastic rounding of gradients** (``stochastic=True``; split key ``grad_stochastic``,
  on by default there; the quantizers' own default is off): the codec's unbiased
  ``floor(v + u)``, ``u ~ U[0, 1)``, so ``E[g_hat] = g`` and the rounding error of a 1-2 bit
  gradient averages out over steps instead of adding the same bias to every client update (the
  usual argument for low-bit gradient compression, as in QSGD). Measured (BENCHMARKS.md, "Split
  learning"): with round-to-nearest, fixed 2-bit MiniLM falls from 74.8% at 80 steps to 67.8%
  (56.2% on another seed) at 200; with stochastic rounding it reaches 78.5%. Each quantizer
  owns a seeded CPU generator (reproducible, global RNG untouched). The fake-quant value is
  still exactly ``dequantize(encode(x))`` and the LSQ residual becomes ``code - v`` (zero
  mean), so the gradient gates' distortion proxy keeps its sign.
- [I] **Budget** (§1.4-1.5), default ``mode="budget"``: an exact *projection*, not a penalty.
  After every gate update all gates of one group (one party and direction, over all its
  boundaries) are shifted by one common offset ``s`` (bisection; the sigmoid is monotone) so
  that their mean continuous bits equal the scheduled target; with largest-remainder rounding
  the mean *integer* bits sent then equal the target to within ``0.5 / C`` at every step.
  A shift preserves the gates' order, so the task loss alone decides *which* channels (and, with
  all-boundaries, which layers: one shift per group) keep more bits; the budget decides how many.
  Why not the penalty of the first version (``lambda * relu(mean(b) - target)^2`` or
  ``lambda * mean(b)``, still available as ``mode="target"`` / ``"mean"`` for ablation): with Adam
  the regularizer moves every gate by the same normalised step, which swamps the task signal
  (every channel ended at the same width) and, with a fixed lr, lags the schedule (a 40-step
  run ended at ~4 bits for targets 2 and 1.5). An adaptive Lagrangian ``lambda`` tracks the
  target only on average and needs its own step size; the projection needs neither.
- [I] **Gate optimizer** (budget mode): momentum SGD on the task-loss gradient after removing
  its mean over the group (a common shift is undone by the projection anyway) and dividing by
  its RMS over the group (:class:`GateController`). Normalising per *group*, not per gate as Adam
  does, keeps the relative magnitudes that carry importance, and makes ``gate_lr`` a loss-scale
  free step in logit units. ``alpha`` only sets the sigmoid's slope here (1.0). The flip side:
  every step has the same size whatever its signal-to-noise ratio, so the step must be small
  for long runs. ``split.gate_lr`` is 0.01: on SmolLM2 over 600 steps AMAQ-3 reached perplexity
  83.9 with it against 92.0 with 0.03 (fixed-3: 84.0); on MiniLM over 200 steps it is level
  or better on every arm (BENCHMARKS.md, "AMAQ gate step").
- [I] **Schedule** (§1.5): :class:`BitSchedule` moves the target linearly from ``init_bits`` to
  the final target over ``warmup_steps`` (start at 6-8 bits, end at 3-4 or lower), then holds it.
  Optionally (``freeze_step``; split key ``gate_freeze_fraction``, off by default) the gates
  stop taking task steps from some step on, the "hard-freeze the integer bits" of §1.5: frozen
  after the warm-up, the bit map sent never changes again. Off by default: freezing at the end
  of the warm-up did not help on MiniLM (AMAQ-2, 6 seeds: 78.95% vs 79.2%) and hurt on SmolLM2
  (AMAQ-3 perplexity 93.3 vs 92.5, worse on 5 of 6 seeds; BENCHMARKS.md, "Split learning"): the
  gates' moves after the warm-up still pay.
- [I] **Optimizer**: gates are never in the LoRA optimizer in budget mode (own controller, own
  lr); in the penalty modes they form their own Adam parameter group (§1.3 "separately").

Bit maps are small (one byte per channel) and are always sent with each tensor: caching them saves
~0.1% of a step and would need a stateful receiver, so we do not (ALGORITHMS.md §1.9 item 3).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from fedq.codec import Granularity, PackedTensor, QuantSpec, dequantize, quantize, raw
from fedq.codec.quantize import restore_rows
from fedq.errors import ConfigError

RegMode = Literal["budget", "target", "mean"]
GateSignal = Literal["task", "fisher"]


class LinkQuantizer(Protocol):
    """What the split runtime needs from a quantizer at one boundary and direction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def encode(self, x: torch.Tensor) -> PackedTensor: ...

    def forward_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, PackedTensor]: ...

    def int_bits(self) -> torch.Tensor | None: ...

    def bit_loss(self) -> torch.Tensor: ...


def _lsq_fake_quant(
    x: torch.Tensor, p: PackedTensor, bits_ste: torch.Tensor | None
) -> torch.Tensor:
    """``dequantize(p)`` in value; gradients: identity into ``x`` and LSQ's
    ``d x_hat / d Delta = round(v) - v`` into ``bits_ste`` (when given) through
    ``Delta = range / (2^b - 1)``. With row scales ``v`` lives in the normalised units the blocks
    were coded in and the term is multiplied back by each row's scale. Per-channel layouts (all
    AMAQ quantizers) broadcast the block parameters instead of copying into the block view."""
    if not x.requires_grad and bits_ste is None:
        return dequantize(p, device=x.device)
    layout = p.layout
    div = None
    if p.row_scales is None and p.outlier_index is None:
        exact = exact_n = dequantize(p, device=x.device)
    else:  # decode the blocks once (normalised units), then the row steps as dequantize does
        core = dataclasses.replace(p, row_scales=None, outlier_index=None, outlier_values=None)
        exact_n = dequantize(core, device=x.device)
        exact = restore_rows(exact_n if p.row_scales is not None else exact_n.clone(), p)
        if p.row_scales is not None:
            rf = p.row_scales.float().to(x.device)
            div = torch.where(rf > 0, rf, torch.ones_like(rf)).view(*x.shape[:-1], 1)
    out = exact
    if x.requires_grad:  # straight-through: identity into x, zero in value
        out = (exact.float() + (x - x.detach()).float()).to(x.dtype)
    if bits_ste is None or p.offsets is None:
        return out
    chan = layout.granularity is Granularity.CHANNEL
    shape = [1] * len(p.shape)
    if chan:
        shape[layout.axis] = -1

    def par(t: torch.Tensor) -> torch.Tensor:  # one value per block, broadcastable
        return t.view(shape) if chan else t.unsqueeze(1)

    def blk(t: torch.Tensor) -> torch.Tensor:
        return t.float() if chan else layout.to_blocks(t).float()

    with torch.no_grad():  # resid = code - v per element (in place: one buffer each)
        offset = par(p.offsets.float().to(x.device))
        scale = p.scales.float().to(x.device)
        safe = par(torch.where(scale > 0, scale, torch.ones_like(scale)))
        xs = x.detach() if div is None else x.detach() / div
        v = torch.sub(blk(xs), offset).div_(safe)  # first op out of place: never touch x
        resid = torch.sub(blk(exact_n), offset).div_(safe).round_().sub_(v)
        if not chan:
            resid = layout.from_blocks(resid)
        if div is not None:
            resid.mul_(div)
        if p.outlier_index is not None:  # sent as float16, not coded: no LSQ term
            resid = resid.reshape(-1, x.shape[-1])
            resid[p.outlier_index.to(device=x.device, dtype=torch.int64)] = 0.0
            resid = resid.reshape(x.shape)
        rng = scale * (2.0 ** p.bits.to(x.device).float() - 1.0)
    delta = rng / (2.0**bits_ste - 1.0)
    d = delta - delta.detach()  # zero in value
    term = (
        d.view(shape) if chan else layout.from_blocks(d.unsqueeze(1).expand(-1, layout.block_len))
    )
    return (out.float() + term * resid).to(x.dtype)


def _rounding_generator(stochastic: bool, seed: int) -> torch.Generator | None:
    """The quantizer's own CPU generator for stochastic rounding (None: round to nearest), so
    the rounding noise is reproducible and leaves the global RNG (dropout, batches) untouched."""
    return torch.Generator().manual_seed(int(seed)) if stochastic else None


def _gen_for(q: nn.Module, x: torch.Tensor) -> torch.Generator | None:
    """The quantizer's generator: on the CPU the noise stream itself, elsewhere the source of
    one counter-noise seed per tensor (:mod:`fedq.codec.noise`)."""
    return getattr(q, "generator", None)


def largest_remainder(b: torch.Tensor, b_min: int, b_max: int) -> torch.Tensor:
    """Integer bits whose sum is ``round(sum(b))``: ``floor(b)`` plus one bit for the channels with
    the largest fractional parts (ties: lower index first). Float tensor, values in
    ``[b_min, b_max]`` (module docstring, "Integer bits")."""
    b = b.detach().float().clamp(b_min, b_max)
    base = b.floor()
    frac = b - base
    extra = round(float(frac.double().sum()))
    out = base.clone()
    if extra > 0:
        order = torch.sort(frac, descending=True, stable=True).indices[:extra]
        out[order] += 1.0
    return out.clamp(b_min, b_max)


class AmaqQuantizer(nn.Module):
    """Learned per-channel (or per-token) bit-widths with an LSQ training path (module docstring).

    ``num_channels`` is ``d`` (or ``T`` with ``per_token``). ``gate`` is the only parameter.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        b_min: int = 2,
        b_max: int = 8,
        alpha: float = 1.0,
        init_bits: float = 7.5,
        per_token: bool = False,
        scale_dtype: str = "float16",
        stochastic: bool = False,
        seed: int = 0,
        quant_range: Literal["minmax", "sigma", "mse"] = "minmax",
        row_scale: bool = False,
        outlier_ratio: float = 0.0,
        signal: GateSignal = "task",
    ) -> None:
        super().__init__()
        problems = []
        if signal not in ("task", "fisher"):
            problems.append(f"signal must be 'task' or 'fisher', got {signal!r}")
        if num_channels < 1:
            problems.append(f"num_channels must be >= 1, got {num_channels}")
        if not 1 <= b_min < b_max <= 8:
            problems.append(f"need 1 <= b_min < b_max <= 8, got {b_min}, {b_max}")
        elif not b_min <= init_bits <= b_max:
            problems.append(f"init_bits must lie in [b_min, b_max], got {init_bits}")
        if not alpha > 0:
            problems.append(f"alpha must be > 0, got {alpha}")
        if problems:
            raise ConfigError(problems)
        self.b_min, self.b_max, self.alpha = int(b_min), int(b_max), float(alpha)
        self.per_token = per_token
        self.signal: GateSignal = signal
        self.spec = QuantSpec(
            granularity=Granularity.CHANNEL, axis=-2 if per_token else -1, scale_dtype=scale_dtype,
            stochastic=stochastic, range=quant_range, row_scale=row_scale,
            outlier_ratio=outlier_ratio,
        )  # fmt: skip
        self.generator = _rounding_generator(stochastic, seed)
        frac = min(max((init_bits - b_min) / (b_max - b_min), 0.02), 0.98)
        q0 = math.log(frac / (1 - frac)) / self.alpha
        self.gate = nn.Parameter(torch.full((num_channels,), q0))

    # -- bits ------------------------------------------------------------------------------------
    def bits(self) -> torch.Tensor:
        """Continuous bits per channel, differentiable in the gates."""
        return self.b_min + (self.b_max - self.b_min) * torch.sigmoid(self.alpha * self.gate)

    def bits_ste(self) -> torch.Tensor:
        """Transmitted bits in value, continuous bits in gradient (straight-through)."""
        b = self.bits()
        return b + (largest_remainder(b.detach(), self.b_min, self.b_max) - b.detach())

    def int_bits(self) -> torch.Tensor:
        """The uint8 bit map that is transmitted: largest-remainder rounding of the continuous
        bits, so its sum is ``round(sum(b))`` (module docstring)."""
        with torch.no_grad():
            b = largest_remainder(self.bits(), self.b_min, self.b_max)
            return b.to(torch.uint8).cpu()

    def bit_loss(self) -> torch.Tensor:
        """Mean transmitted bits, differentiable (STE); see :func:`bit_penalty`."""
        return self.bits_ste().mean()

    # -- coding ----------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        dim = x.shape[-2] if self.per_token else x.shape[-1]
        if x.dim() < 2 or dim != self.gate.numel():
            what = "tokens" if self.per_token else "channels"
            raise ConfigError(f"AMAQ quantizer has {self.gate.numel()} {what}, got {list(x.shape)}")

    def encode(self, x: torch.Tensor) -> PackedTensor:
        """Pack ``x`` at the current integer bit map (exactly what ``forward`` models)."""
        self._check(x)
        return quantize(x.detach(), self.int_bits(), self.spec, generator=_gen_for(self, x))

    def forward_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, PackedTensor]:
        """``(fake-quantized x, packed x)``; the first equals ``dequantize`` of the second.

        With ``signal="fisher"`` the output carries no path into the gates; instead, when the
        backward reaches it, :meth:`_fisher_grad` adds the Fisher-weighted distortion's gradient
        (module docstring, "Gate signal") to ``gate.grad``."""
        p = self.encode(x)
        if self.signal == "task":
            return _lsq_fake_quant(x, p, self.bits_ste()), p
        out = _lsq_fake_quant(x, p, None)
        if torch.is_grad_enabled() and self.gate.requires_grad:
            if not out.requires_grad:  # data straight from the input: still want dL/dx_hat
                out.requires_grad_()
            xd = x.detach()
            out.register_hook(lambda g: self._fisher_grad(xd, p, g))
        return out, p

    def _fisher_grad(self, x: torch.Tensor, p: PackedTensor, g: torch.Tensor) -> None:
        """Accumulate ``d/d gate`` of ``sum(g^2 * (x_hat - x)^2)`` (``g``: the gradient that
        reached the fake-quantized output) into ``gate.grad``; returns None so ``g`` goes on
        unchanged."""
        with torch.enable_grad():
            err = _lsq_fake_quant(x, p, self.bits_ste()).float() - x.float()
            self._add_gate_grad((g.detach().float().square() * err.square()).sum())

    def _add_gate_grad(self, proxy: torch.Tensor) -> None:
        """Accumulate ``d proxy / d gate`` into ``gate.grad`` (the proxies' gradients)."""
        (grad,) = torch.autograd.grad(proxy, [self.gate])
        self.gate.grad = grad if self.gate.grad is None else self.gate.grad + grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_encode(x)[0]

    def quantize_gradient(self, g: torch.Tensor) -> tuple[torch.Tensor, PackedTensor, float]:
        """Quantize a gradient for sending and accumulate the distortion proxy's gradient
        (relative squared error) into ``gate.grad``. Returns ``(g_hat, packed, rel_error)``."""
        g = g.detach()
        with torch.enable_grad():  # the LSQ path whatever ``signal`` (that is for activations)
            p = self.encode(g)
            g_hat = _lsq_fake_quant(g, p, self.bits_ste())
            err = ((g_hat.float() - g.float()) ** 2).sum() / (g.float() ** 2).sum().clamp_min(1e-30)
            self._add_gate_grad(err)
        return g_hat.detach(), p, float(err.detach())

    def extra_repr(self) -> str:
        return (
            f"channels={self.gate.numel()}, bits=[{self.b_min}, {self.b_max}], "
            f"alpha={self.alpha}, per_token={self.per_token}, stochastic={self.spec.stochastic}, "
            f"signal={self.signal}"
        )


class FixedQuantizer(nn.Module):
    """Fixed ``bits`` per channel or per group with straight-through training ("QAT-Group",
    ALGORITHMS.md §1.7): same codec, no gates, no regularizer."""

    def __init__(
        self,
        bits: int,
        *,
        granularity: Literal["channel", "group", "tensor"] = "channel",
        group_size: int = 128,
        scale_dtype: str = "float16",
        stochastic: bool = False,
        seed: int = 0,
        quant_range: Literal["minmax", "sigma", "mse"] = "minmax",
        row_scale: bool = False,
        outlier_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ConfigError(f"fixed bits must be in 1..8, got {bits}")
        self.bits = int(bits)
        self.spec = QuantSpec(
            granularity=Granularity(granularity), axis=-1, group_size=group_size,
            scale_dtype=scale_dtype, stochastic=stochastic, range=quant_range, row_scale=row_scale,
            outlier_ratio=outlier_ratio,
        )  # fmt: skip
        self.generator = _rounding_generator(stochastic, seed)

    def int_bits(self) -> torch.Tensor | None:
        return None

    def bit_loss(self) -> torch.Tensor:
        return torch.zeros(())

    def encode(self, x: torch.Tensor) -> PackedTensor:
        return quantize(x.detach(), self.bits, self.spec, generator=_gen_for(self, x))

    def forward_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, PackedTensor]:
        p = self.encode(x)
        return _lsq_fake_quant(x, p, None), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_encode(x)[0]

    def quantize_gradient(self, g: torch.Tensor) -> tuple[torch.Tensor, PackedTensor, float]:
        g = g.detach()
        g_hat, p = self.forward_encode(g)
        err = float(((g_hat - g) ** 2).sum() / (g**2).sum().clamp_min(1e-30))
        return g_hat, p, err


class IdentityQuantizer(nn.Module):
    """No compression: the tensor's own bytes (fp32 / bf16 baseline, parity reference)."""

    def int_bits(self) -> torch.Tensor | None:
        return None

    def bit_loss(self) -> torch.Tensor:
        return torch.zeros(())

    def encode(self, x: torch.Tensor) -> PackedTensor:
        return raw(x.detach())

    def forward_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, PackedTensor]:
        return x, self.encode(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def quantize_gradient(self, g: torch.Tensor) -> tuple[torch.Tensor, PackedTensor, float]:
        return g.detach(), self.encode(g), 0.0


@dataclass(frozen=True, slots=True)
class BitSchedule:
    """Bit target (and penalty weight) over training steps (ALGORITHMS.md §1.4-1.5, [I]).

    The target moves linearly from ``start_bits`` to ``target_bits`` over ``warmup_steps`` and
    then holds. From ``freeze_step`` on (budget mode; None: never) the gates take no task-loss
    step, only the projection, so the integer bit map stops changing once the target holds.
    ``mode="budget"`` (default): :class:`GateController` projects the gates onto the
    target exactly; no penalty. ``mode="target"``: penalty ``lam * relu(mean_bits -
    target(step))^2``. ``mode="mean"``: ``lam(step) * mean_bits`` with ``lam`` ramped linearly from
    0 over ``warmup_steps`` (no target: the task loss alone decides where bits stop).
    """

    lam: float = 1.0
    target_bits: float = 4.0
    start_bits: float = 8.0
    warmup_steps: int = 100
    mode: RegMode = "budget"
    freeze_step: int | None = None  # budget mode: from this step on the gates take no task step

    def frozen(self, step: int) -> bool:
        return self.freeze_step is not None and step >= self.freeze_step

    def progress(self, step: int) -> float:
        return 1.0 if self.warmup_steps <= 0 else min(max(step / self.warmup_steps, 0.0), 1.0)

    def target_at(self, step: int) -> float:
        f = self.progress(step)
        return self.start_bits + (self.target_bits - self.start_bits) * f

    def lam_at(self, step: int) -> float:
        return self.lam * (self.progress(step) if self.mode == "mean" else 1.0)


def bit_penalty(
    quantizers: Sequence[nn.Module], schedule: BitSchedule, step: int
) -> torch.Tensor | None:
    """The bit regularizer over every AMAQ quantizer in ``quantizers`` (others are skipped):
    ``mean`` over all their channels of the transmitted (STE-rounded) bits, then the schedule's
    penalty. ``None`` when there is no learned quantizer or in budget mode (no penalty)."""
    amaq = [q for q in quantizers if isinstance(q, AmaqQuantizer)]
    if not amaq or schedule.mode == "budget":
        return None
    mean = torch.cat([q.bits_ste() for q in amaq]).mean()
    if schedule.mode == "mean":
        return schedule.lam_at(step) * mean
    return schedule.lam * torch.relu(mean - schedule.target_at(step)) ** 2


def project_budget(quantizers: Sequence[nn.Module], target: float) -> float:
    """Shift the gates of every AMAQ quantizer in ``quantizers`` by one common offset so that the
    mean continuous bits over all their channels equal ``target`` (bisection); returns the shift.

    The target is kept 0.01 bit inside ``(b_min, b_max)`` of the group, which the sigmoid cannot
    reach exactly; largest-remainder rounding then sends exactly ``b_min``/``b_max`` bits."""
    amaq = [q for q in quantizers if isinstance(q, AmaqQuantizer)]
    if not amaq:
        return 0.0
    lo_b = sum(q.b_min * q.gate.numel() for q in amaq)
    hi_b = sum(q.b_max * q.gate.numel() for q in amaq)
    n = sum(q.gate.numel() for q in amaq)
    want = min(max(target * n, lo_b + 0.01 * n), hi_b - 0.01 * n)

    def total(shift: float) -> float:
        return sum(
            float((q.b_min + (q.b_max - q.b_min) * torch.sigmoid(q.alpha * (q.gate + shift))).sum())
            for q in amaq
        )

    with torch.no_grad():
        span = max(float(q.gate.abs().max()) for q in amaq) + max(20.0 / q.alpha for q in amaq)
        lo, hi = -span, span
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if total(mid) < want:
                lo = mid
            else:
                hi = mid
        shift = 0.5 * (lo + hi)
        for q in amaq:
            q.gate.add_(shift)
    return shift


class GateController:
    """Gate updates of one party in budget mode (module docstring, "Budget" and "Gate
    optimizer"): per group, centre and RMS-normalise the task-loss gradient of all its gates,
    take a momentum-SGD step, then :func:`project_budget` onto the scheduled target of the next
    step. ``groups`` are lists of quantizers (non-AMAQ members are ignored)."""

    def __init__(
        self,
        groups: Sequence[Sequence[nn.Module]],
        schedule: BitSchedule,
        lr: float,
        momentum: float = 0.9,
    ) -> None:
        self.groups = [[q for q in g if isinstance(q, AmaqQuantizer)] for g in groups]
        self.groups = [g for g in self.groups if g]
        self.schedule = schedule
        self.lr = float(lr)
        self.momentum = float(momentum)
        self._buf: list[torch.Tensor | None] = [None] * len(self.groups)

    def parameters(self) -> list[nn.Parameter]:
        return [q.gate for g in self.groups for q in g]

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Update (unless the schedule has frozen the gates), project to ``target_at(step + 1)``
        and zero the gates' gradients."""
        target = self.schedule.target_at(step + 1)
        for i, group in enumerate(self.groups):
            if not self.schedule.frozen(step):
                self._task_step(i, group)
            project_budget(group, target)
            for q in group:
                q.gate.grad = None

    def _task_step(self, i: int, group: list[AmaqQuantizer]) -> None:
        grads = [q.gate.grad if q.gate.grad is not None else torch.zeros_like(q.gate)
                 for q in group]  # fmt: skip
        g = torch.cat([x.detach().float().reshape(-1) for x in grads])
        g = g - g.mean()
        rms = float(g.square().mean().sqrt())
        if not (rms > 0 and torch.isfinite(g).all()):
            return
        g = g / rms
        buf = self._buf[i]
        buf = g if buf is None else self.momentum * buf + g
        self._buf[i] = buf
        off = 0
        for q in group:
            k = q.gate.numel()
            q.gate.sub_(self.lr * buf[off : off + k].view_as(q.gate).to(q.gate.dtype))
            off += k


def bit_stats(q: nn.Module) -> dict[str, float] | None:
    """Mean / min / max of the integer bit map of an AMAQ quantizer (None for the others)."""
    if not isinstance(q, AmaqQuantizer):
        return None
    b = q.int_bits().float()
    return {"mean": float(b.mean()), "min": float(b.min()), "max": float(b.max())}


#: Any of the three quantizers (they share the :class:`LinkQuantizer` interface).
QuantModule = AmaqQuantizer | FixedQuantizer | IdentityQuantizer
