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
- [I] **Range** (§1.3 item 1): asymmetric min-max per channel over the ``B*T`` tokens of the
  micro-batch, exactly as :func:`fedq.codec.quantize` does it (float16 offset rounded down, scale
  rounded up). Nothing is ever clipped, so the straight-through gradient into the sender's layers
  is the identity everywhere (§1.3 item 4).
- [I] **Integer bits** (§1.3 item 2): ``round(b)``, not ``ceil(b)``. With ``round`` the mean of
  the transmitted bits tracks the mean of the continuous bits (``ceil`` adds ~0.5 bit to every
  channel and makes averages such as 1.5 bits unreachable with ``b_min = 1``); the budget is still
  honoured because the regularizer is applied to the *rounded* bits through a straight-through
  estimator (``d round(b) / d b = 1``), i.e. to what is actually sent.
- [I] **Task loss into Q** (§1.3 item 3): LSQ-style. ``Delta(b) = range / (2^b - 1)`` is a
  differentiable function of the (STE-rounded) bits and ``d x_hat / d Delta = round(v) - v`` with
  ``v = (x - offset) / Delta`` (Esser et al. 2020). Chosen over FracBits interpolation because the
  forward value then *is* the transmitted tensor at the integer bits (one quantizer evaluation per
  forward, no training/inference mismatch, nothing interpolated that the receiver never sees).
  The forward is computed by the codec itself, ``dequantize(quantize(x))``, and the surrogate only
  adds ``s - s.detach()`` (exactly zero), so fake-quant equals ``dequantize(encode(x))`` **bit for
  bit** (tested).
- [I] **Gradient direction** (§1.6): the gradient ``dL/dX`` has its own gates (statistics differ
  from activations), held by the party that sends it (the server). The task loss has no
  differentiable path into those gates, so they are trained on a distortion proxy, the relative
  quantization error ``||g_hat - g||^2 / ||g||^2`` (LSQ path again), plus the same bit regularizer.
  Gradients are tiny (the loss is a batch mean), so the gradient direction defaults to float32
  scales: float16 would flush their steps to subnormals.
- [I] **Regularizer** (§1.4): ``lambda * relu(mean(b_hat) - target_t)^2`` over every quantizer of
  one party and direction (all boundaries together, so sensitive layers may keep more bits:
  layer-wise importance), or plain ``lambda_t * mean(b_hat)``. :class:`BitSchedule` moves the
  target linearly from ``init_bits`` to the final target over ``warmup_steps`` (§1.5: start at
  6-8, end at 3-4 or lower), then holds it.
- [I] **Optimizer**: gates go in their own parameter group (Adam, own lr; §1.3 "separately").

Bit maps are small (one byte per channel) and are always sent with each tensor: caching them saves
~0.1% of a step and would need a stateful receiver, so we do not (ALGORITHMS.md §1.9 item 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from fedq.codec import Granularity, PackedTensor, QuantSpec, dequantize, quantize, raw
from fedq.errors import ConfigError

RegMode = Literal["target", "mean"]


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
    ``Delta = range / (2^b - 1)``."""
    exact = dequantize(p, device=x.device)
    if not x.requires_grad and bits_ste is None:
        return exact
    layout = p.layout
    xb = layout.to_blocks(x).float()
    offset = p.offsets.float().to(x.device).unsqueeze(1) if p.offsets is not None else None
    scale = p.scales.float().to(x.device).unsqueeze(1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    surr = xb
    if bits_ste is not None and offset is not None:
        with torch.no_grad():
            v = (xb - offset) / safe
            q = (layout.to_blocks(exact).float() - offset) / safe
            resid = q.round() - v  # round(v) - v, with the clamp the codec applied
            rng = scale * (2.0 ** p.bits.to(x.device).float().unsqueeze(1) - 1.0)
        delta = rng / (2.0 ** bits_ste.unsqueeze(1) - 1.0)
        surr = xb + delta * resid
    out = layout.to_blocks(exact).float() + (surr - surr.detach())
    return layout.from_blocks(out).to(x.dtype)


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
    ) -> None:
        super().__init__()
        problems = []
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
        self.spec = QuantSpec(
            granularity=Granularity.CHANNEL, axis=-2 if per_token else -1, scale_dtype=scale_dtype
        )
        frac = min(max((init_bits - b_min) / (b_max - b_min), 0.02), 0.98)
        q0 = math.log(frac / (1 - frac)) / self.alpha
        self.gate = nn.Parameter(torch.full((num_channels,), q0))

    # -- bits ------------------------------------------------------------------------------------
    def bits(self) -> torch.Tensor:
        """Continuous bits per channel, differentiable in the gates."""
        return self.b_min + (self.b_max - self.b_min) * torch.sigmoid(self.alpha * self.gate)

    def bits_ste(self) -> torch.Tensor:
        """Rounded bits in value, continuous bits in gradient (straight-through)."""
        b = self.bits()
        return b + (b.detach().round().clamp(self.b_min, self.b_max) - b.detach())

    def int_bits(self) -> torch.Tensor:
        """The uint8 bit map that is transmitted: ``round(b)`` (module docstring)."""
        with torch.no_grad():
            return self.bits().round().clamp(self.b_min, self.b_max).to(torch.uint8).cpu()

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
        return quantize(x.detach(), self.int_bits(), self.spec)

    def forward_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, PackedTensor]:
        """``(fake-quantized x, packed x)``; the first equals ``dequantize`` of the second."""
        p = self.encode(x)
        return _lsq_fake_quant(x, p, self.bits_ste()), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_encode(x)[0]

    def quantize_gradient(self, g: torch.Tensor) -> tuple[torch.Tensor, PackedTensor, float]:
        """Quantize a gradient for sending and accumulate the distortion proxy's gradient
        (relative squared error) into ``gate.grad``. Returns ``(g_hat, packed, rel_error)``."""
        g = g.detach()
        with torch.enable_grad():
            g_hat, p = self.forward_encode(g)
            err = ((g_hat.float() - g.float()) ** 2).sum() / (g.float() ** 2).sum().clamp_min(1e-30)
            (grad,) = torch.autograd.grad(err, [self.gate])
        self.gate.grad = grad if self.gate.grad is None else self.gate.grad + grad
        return g_hat.detach(), p, float(err.detach())

    def extra_repr(self) -> str:
        return (
            f"channels={self.gate.numel()}, bits=[{self.b_min}, {self.b_max}], "
            f"alpha={self.alpha}, per_token={self.per_token}"
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
    ) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ConfigError(f"fixed bits must be in 1..8, got {bits}")
        self.bits = int(bits)
        self.spec = QuantSpec(
            granularity=Granularity(granularity), axis=-1, group_size=group_size,
            scale_dtype=scale_dtype,
        )  # fmt: skip

    def int_bits(self) -> torch.Tensor | None:
        return None

    def bit_loss(self) -> torch.Tensor:
        return torch.zeros(())

    def encode(self, x: torch.Tensor) -> PackedTensor:
        return quantize(x.detach(), self.bits, self.spec)

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
    """Regularizer weight and target over training steps (ALGORITHMS.md §1.4-1.5, [I]).

    ``mode="target"``: penalty ``lam * relu(mean_bits - target(step))^2`` where the target moves
    linearly from ``start_bits`` to ``target_bits`` over ``warmup_steps`` and then holds.
    ``mode="mean"``: ``lam(step) * mean_bits`` with ``lam`` ramped linearly from 0 over
    ``warmup_steps`` (no target: the task loss alone decides where bits stop).
    """

    lam: float = 1.0
    target_bits: float = 4.0
    start_bits: float = 8.0
    warmup_steps: int = 100
    mode: RegMode = "target"

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
    penalty. ``None`` when there is no learned quantizer."""
    amaq = [q for q in quantizers if isinstance(q, AmaqQuantizer)]
    if not amaq:
        return None
    mean = torch.cat([q.bits_ste() for q in amaq]).mean()
    if schedule.mode == "mean":
        return schedule.lam_at(step) * mean
    return schedule.lam * torch.relu(mean - schedule.target_at(step)) ** 2


def bit_stats(q: nn.Module) -> dict[str, float] | None:
    """Mean / min / max of the integer bit map of an AMAQ quantizer (None for the others)."""
    if not isinstance(q, AmaqQuantizer):
        return None
    b = q.int_bits().float()
    return {"mean": float(b.mean()), "min": float(b.min()), "max": float(b.max())}


#: Any of the three quantizers (they share the :class:`LinkQuantizer` interface).
QuantModule = AmaqQuantizer | FixedQuantizer | IdentityQuantizer
