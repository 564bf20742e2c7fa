"""AMAQ: learned per-channel bit-widths for split-learning activations and gradients.

Song et al., "AMAQ: Adaptive Mixed-bit Activation Quantization for Collaborative PEFT" (arXiv
2510.05468), as fedq implements it: docs/algorithms.md §1 for the method and §5 for fedq's own
choices and why (gate form, integer bits by largest remainder, the LSQ training path, the
Fisher gate signal, gradient gates on a distortion proxy, the exact budget projection, the gate
optimizer and the schedule). Measured results: BENCHMARKS.md, "Split learning".

Three :class:`~fedq.adapt.cut.CutCodec` implementations live here: :class:`AmaqQuantizer` (learned
bits), :class:`FixedQuantizer` (fixed bits per channel, the QAT baseline) and
:class:`IdentityQuantizer` (fp32, the parity reference). The fake-quantized value each returns is
bit for bit ``dequantize`` of what it sends (tested).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fedq.adapt.cut import CutCodec, Direction
from fedq.codec import (
    Granularity,
    IdentityCompressor,
    PackedTensor,
    QuantCompressor,
    QuantSpec,
    dequantize,
)
from fedq.codec.reference import restore_rows
from fedq.errors import ConfigError

GateSignal = Literal["task", "fisher"]
QuantRange = Literal["minmax", "sigma", "mse"]
#: Momentum of the gates' normalised SGD (:class:`GateController`).
GATE_MOMENTUM = 0.9


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


def _relative_error(g_hat: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return ((g_hat.float() - g.float()) ** 2).sum() / (g.float() ** 2).sum().clamp_min(1e-30)


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


class AmaqQuantizer(CutCodec):
    """Learned per-channel bit-widths (last dim of ``[B, T, d]``) with an LSQ training path.

    ``b_c = b_min + (b_max - b_min) * sigmoid(gate_c)``; ``gate`` is the only parameter, set so
    that every channel starts at ``init_bits``. The bit map sent is the largest-remainder rounding
    of the continuous bits (:func:`largest_remainder`).
    """

    name = "amaq"

    def __init__(
        self,
        num_channels: int,
        *,
        b_min: int = 2,
        b_max: int = 8,
        init_bits: float = 7.5,
        scale_dtype: str = "float16",
        stochastic: bool = False,
        seed: int = 0,
        quant_range: QuantRange = "minmax",
        row_scale: bool = False,
        outlier_ratio: float = 0.0,
        signal: GateSignal = "task",
        direction: Direction = "act",
    ) -> None:
        super().__init__(direction)
        problems = []
        if signal not in ("task", "fisher"):
            problems.append(f"signal must be 'task' or 'fisher', got {signal!r}")
        if num_channels < 1:
            problems.append(f"num_channels must be >= 1, got {num_channels}")
        if not 1 <= b_min < b_max <= 8:
            problems.append(f"need 1 <= b_min < b_max <= 8, got {b_min}, {b_max}")
        elif not b_min <= init_bits <= b_max:
            problems.append(f"init_bits must lie in [b_min, b_max], got {init_bits}")
        if problems:
            raise ConfigError(problems)
        self.b_min, self.b_max = int(b_min), int(b_max)
        self.signal: GateSignal = signal
        self.spec = QuantSpec(
            granularity=Granularity.CHANNEL,
            axis=-1,
            scale_dtype=scale_dtype,
            stochastic=stochastic,
            range=quant_range,
            row_scale=row_scale,
            outlier_ratio=outlier_ratio,
        )
        self.compressor = QuantCompressor(self.spec, seed=seed)
        frac = min(max((init_bits - b_min) / (b_max - b_min), 0.02), 0.98)
        self.gate = nn.Parameter(torch.full((num_channels,), math.log(frac / (1 - frac))))

    # -- bits ------------------------------------------------------------------------------------
    def bits(self) -> torch.Tensor:
        """Continuous bits per channel, differentiable in the gates."""
        return self.b_min + (self.b_max - self.b_min) * torch.sigmoid(self.gate)

    def bits_ste(self) -> torch.Tensor:
        """Transmitted bits in value, continuous bits in gradient (straight-through)."""
        b = self.bits()
        return b + (largest_remainder(b.detach(), self.b_min, self.b_max) - b.detach())

    def int_bits(self) -> torch.Tensor:
        """The uint8 bit map that is transmitted: largest-remainder rounding of the continuous
        bits, so its sum is ``round(sum(b))``."""
        with torch.no_grad():
            b = largest_remainder(self.bits(), self.b_min, self.b_max)
            return b.to(torch.uint8).cpu()

    # -- coding ----------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[-1] != self.gate.numel():
            raise ConfigError(
                f"AMAQ quantizer has {self.gate.numel()} channels, got {list(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> PackedTensor:
        """Pack ``x`` at the current integer bit map (exactly what ``forward`` models)."""
        self._check(x)
        return self.compressor.compress("", x.detach(), self.int_bits())

    def forward_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, PackedTensor]:
        """``(fake-quantized x, packed x)``; the first equals ``dequantize`` of the second.

        With ``signal="fisher"`` the output carries no path into the gates; instead, when the
        backward reaches it, :meth:`_fisher_grad` adds the gradient-weighted distortion's gradient
        to ``gate.grad`` (docs/algorithms.md §5, "Gate signal")."""
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

    def quantize_gradient(self, g: torch.Tensor) -> tuple[torch.Tensor, PackedTensor, float]:
        """Quantize a gradient for sending and accumulate the distortion proxy's gradient
        (relative squared error) into ``gate.grad``. Returns ``(g_hat, packed, rel_error)``."""
        g = g.detach()
        with torch.enable_grad():  # the LSQ path whatever ``signal`` (that is for activations)
            p = self.encode(g)
            g_hat = _lsq_fake_quant(g, p, self.bits_ste())
            err = _relative_error(g_hat, g)
            self._add_gate_grad(err)
        return g_hat.detach(), p, float(err.detach())

    def extra_repr(self) -> str:
        return (
            f"channels={self.gate.numel()}, bits=[{self.b_min}, {self.b_max}], "
            f"stochastic={self.spec.stochastic}, signal={self.signal}"
        )


def spread_bits(width: int, bits: float) -> torch.Tensor:
    """A fixed per-channel bit map of mean ``bits`` (to within ``1 / width``): ``floor(bits)``
    everywhere, and one bit more on ``round(frac * width)`` channels spread evenly over the
    channel index (channel ``c`` gets it when ``floor((c + 1) k / width) > floor(c k / width)``).
    Data-blind, so it is the same map at every step: the fixed-precision baseline at a
    fractional width (docs/algorithms.md §7.2)."""
    lo = math.floor(bits)
    k = round((bits - lo) * width)
    c = torch.arange(width)
    extra = ((c + 1) * k) // width - (c * k) // width
    return (lo + extra).clamp(1, 8).to(torch.uint8)


class FixedQuantizer(CutCodec):
    """Fixed ``bits`` per channel (or group) with straight-through training, the QAT baseline:
    same codec, no gates. A fractional ``bits`` (per channel only) sends the fixed mixed map of
    :func:`spread_bits`, the baseline at any average width."""

    name = "fixed"

    def __init__(
        self,
        bits: float,
        *,
        granularity: Literal["channel", "group", "tensor"] = "channel",
        group_size: int = 128,
        scale_dtype: str = "float16",
        stochastic: bool = False,
        seed: int = 0,
        quant_range: QuantRange = "minmax",
        row_scale: bool = False,
        outlier_ratio: float = 0.0,
        direction: Direction = "act",
    ) -> None:
        super().__init__(direction)
        if not 1 <= bits <= 8:
            raise ConfigError(f"fixed bits must be in 1..8, got {bits}")
        if bits != int(bits) and granularity != "channel":
            raise ConfigError(f"fractional fixed bits ({bits}) need per-channel granularity")
        self.bits: float = int(bits) if bits == int(bits) else float(bits)
        self._map: torch.Tensor | None = None  # the spread map of a fractional width
        self.spec = QuantSpec(
            granularity=Granularity(granularity),
            axis=-1,
            group_size=group_size,
            scale_dtype=scale_dtype,
            stochastic=stochastic,
            range=quant_range,
            row_scale=row_scale,
            outlier_ratio=outlier_ratio,
        )
        self.compressor = QuantCompressor(self.spec, seed=seed)

    def encode(self, x: torch.Tensor) -> PackedTensor:
        return self.compressor.compress("", x.detach(), self.wire_bits(int(x.shape[-1])))

    def wire_bits(self, width: int) -> int | torch.Tensor:
        """What the compressor is given: the integer width, or the fractional width's map."""
        if isinstance(self.bits, int):
            return self.bits
        if self._map is None or self._map.numel() != width:
            self._map = spread_bits(width, self.bits)
        return self._map

    def forward_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, PackedTensor]:
        p = self.encode(x)
        return _lsq_fake_quant(x, p, None), p

    def quantize_gradient(self, g: torch.Tensor) -> tuple[torch.Tensor, PackedTensor, float]:
        g = g.detach()
        g_hat, p = self.forward_encode(g)
        return g_hat, p, float(_relative_error(g_hat, g))


class IdentityQuantizer(CutCodec):
    """No compression: the tensor's own bytes (the fp32 baseline and parity reference)."""

    name = "none"

    def __init__(self, direction: Direction = "act") -> None:
        super().__init__(direction)
        self.compressor = IdentityCompressor()

    def encode(self, x: torch.Tensor) -> PackedTensor:
        return self.compressor.compress("", x.detach(), 32)  # lossless: bits are not used

    def forward_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, PackedTensor]:
        return x, self.encode(x)

    def quantize_gradient(self, g: torch.Tensor) -> tuple[torch.Tensor, PackedTensor, float]:
        return g.detach(), self.encode(g), 0.0


@dataclass(frozen=True, slots=True)
class BitSchedule:
    """The mean-bits target over training steps: linear from ``start_bits`` to ``target_bits``
    over ``warmup_steps``, then held (docs/algorithms.md §1.5 and §5, "Schedule")."""

    target_bits: float = 4.0
    start_bits: float = 8.0
    warmup_steps: int = 100

    def progress(self, step: int) -> float:
        return 1.0 if self.warmup_steps <= 0 else min(max(step / self.warmup_steps, 0.0), 1.0)

    def target_at(self, step: int) -> float:
        f = self.progress(step)
        return self.start_bits + (self.target_bits - self.start_bits) * f


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
            float((q.b_min + (q.b_max - q.b_min) * torch.sigmoid(q.gate + shift)).sum())
            for q in amaq
        )

    with torch.no_grad():
        span = max(float(q.gate.abs().max()) for q in amaq) + 20.0
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
    """Gate updates of one party (docs/algorithms.md §5, "Budget" and "Gate optimizer"): per
    group, centre and RMS-normalise the task-loss gradient of all its gates, take a momentum-SGD
    step, then :func:`project_budget` onto the scheduled target of the next step. ``groups`` are
    lists of quantizers (non-AMAQ members are ignored)."""

    def __init__(
        self, groups: Sequence[Sequence[nn.Module]], schedule: BitSchedule, lr: float
    ) -> None:
        self.groups = [[q for q in g if isinstance(q, AmaqQuantizer)] for g in groups]
        self.groups = [g for g in self.groups if g]
        self.schedule = schedule
        self.lr = float(lr)
        self._buf: list[torch.Tensor | None] = [None] * len(self.groups)

    def parameters(self) -> list[nn.Parameter]:
        return [q.gate for g in self.groups for q in g]

    @torch.no_grad()
    def step(self, step: int, target: float | None = None) -> None:
        """Update, project to ``target`` (default: the schedule's ``target_at(step + 1)``; a run
        under a byte budget passes its planned bits, :mod:`fedq.split.budget`) and zero the
        gates' gradients."""
        if target is None:
            target = self.schedule.target_at(step + 1)
        for i, group in enumerate(self.groups):
            self._task_step(i, group)
            project_budget(group, target)
            for q in group:
                q.gate.grad = None

    def _task_step(self, i: int, group: list[AmaqQuantizer]) -> None:
        grads = [
            q.gate.grad if q.gate.grad is not None else torch.zeros_like(q.gate) for q in group
        ]
        g = torch.cat([x.detach().float().reshape(-1) for x in grads])
        g = g - g.mean()
        rms = float(g.square().mean().sqrt())
        if not (rms > 0 and torch.isfinite(g).all()):
            return
        g = g / rms
        buf = self._buf[i]
        buf = g if buf is None else GATE_MOMENTUM * buf + g
        self._buf[i] = buf
        off = 0
        for q in group:
            k = q.gate.numel()
            q.gate.sub_(self.lr * buf[off : off + k].view_as(q.gate).to(q.gate.dtype))
            off += k

    def state_dict(self) -> dict[str, list[torch.Tensor | None]]:
        """The momentum buffers (the gates themselves are the quantizers' parameters)."""
        return {"momentum": [None if b is None else b.clone() for b in self._buf]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor | None]]) -> None:
        bufs = list(state.get("momentum", []))
        if len(bufs) != len(self._buf):
            raise ConfigError(f"gate controller state has {len(bufs)} groups, not {len(self._buf)}")
        self._buf = [None if b is None else b.clone() for b in bufs]


def bit_stats(q: nn.Module) -> dict[str, float] | None:
    """Mean / min / max of the integer bit map of a learned cut codec (None for the others)."""
    return q.bit_stats() if isinstance(q, CutCodec) else None
