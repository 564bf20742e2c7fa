"""Quantizers of each boundary and direction, built from the ``split:`` section.

Who holds what ([I], ALGORITHMS.md §1.6): the sender of a tensor owns its quantizer, so the client
holds the activation gates at the cut and the server the gradient gates. In all-boundaries mode
every inner boundary gets both (simulated in process, see
:class:`~fedq.split.models.SimulatedBoundary`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from fedq.adapt.amaq import (
    AmaqQuantizer,
    BitSchedule,
    FixedQuantizer,
    GateController,
    IdentityQuantizer,
    QuantModule,
)
from fedq.adapt.aqsgd import DeltaQuantizer
from fedq.codec import Granularity, PackedTensor, QuantSpec, dequantize, quantize, raw
from fedq.errors import FedqError
from fedq.split.config import SplitConfig
from fedq.split.models import SimulatedBoundary

Direction = Literal["act", "grad"]


def make_quantizer(
    sc: SplitConfig, direction: Direction, hidden: int, max_length: int, seed: int = 0
) -> QuantModule:
    """The quantizer for one boundary and direction (``act_codec`` / ``grad_codec``); ``seed``
    seeds its stochastic-rounding generator (``grad_stochastic``)."""
    codec = sc.act_codec if direction == "act" else sc.grad_codec
    sdt = sc.act_scale_dtype if direction == "act" else sc.grad_scale_dtype
    sr = direction == "grad" and sc.grad_stochastic
    outl = sc.act_outlier_ratio if direction == "act" else sc.grad_outlier_ratio
    if codec == "none":
        return IdentityQuantizer()
    if codec == "aqsgd":
        return DeltaQuantizer(sc.fixed_bits, granularity=sc.fixed_granularity,
                              group_size=sc.group_size, scale_dtype=sdt,
                              quant_range=sc.quant_range, row_scale=sc.row_scale,
                              outlier_ratio=outl)  # fmt: skip
    if codec == "fixed":
        return FixedQuantizer(sc.fixed_bits, granularity=sc.fixed_granularity,
                              group_size=sc.group_size, scale_dtype=sdt, stochastic=sr,
                              seed=seed, quant_range=sc.quant_range,
                              row_scale=sc.row_scale, outlier_ratio=outl)  # fmt: skip
    return AmaqQuantizer(
        max_length if sc.per_token else hidden, b_min=sc.b_min, b_max=sc.b_max, alpha=sc.alpha,
        init_bits=sc.init_bits, per_token=sc.per_token, scale_dtype=sdt, stochastic=sr,
        seed=seed, quant_range=sc.quant_range, row_scale=sc.row_scale, outlier_ratio=outl,
        signal=sc.act_gate_signal if direction == "act" else "task",
    )  # fmt: skip


def boundary_factory(sc: SplitConfig, hidden: int, max_length: int) -> object:
    """A zero-argument callable making inner :class:`SimulatedBoundary` objects, or None."""
    if not sc.all_boundaries:
        return None

    made = [0]

    def make() -> SimulatedBoundary:
        made[0] += 1  # a distinct stochastic-rounding stream per inner boundary
        return SimulatedBoundary(
            make_quantizer(sc, "act", hidden, max_length),
            make_quantizer(sc, "grad", hidden, max_length, seed=made[0]),
        )

    return make


def bit_schedule(sc: SplitConfig, total_steps: int) -> BitSchedule:
    return BitSchedule(
        lam=sc.reg_lambda, target_bits=sc.target_bits, start_bits=sc.init_bits,
        warmup_steps=max(1, round(sc.warmup_fraction * total_steps)), mode=sc.reg_mode,
        freeze_step=(
            None if sc.gate_freeze_fraction >= 1 else round(sc.gate_freeze_fraction * total_steps)
        ),
    )  # fmt: skip


def gate_parameters(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for n, p in m.named_parameters() if n.endswith("gate")]


def gate_controller(
    sc: SplitConfig, groups: Sequence[Sequence[nn.Module]], schedule: BitSchedule
) -> GateController | None:
    """Budget mode: the party's :class:`GateController` over its groups (one per direction);
    None in the penalty modes (gates then sit in the optimizer) or without AMAQ quantizers."""
    if sc.reg_mode != "budget":
        return None
    ctl = GateController(groups, schedule, sc.gate_lr, sc.gate_momentum)
    return ctl if ctl.groups else None


def split_optimizer(
    lora: list[nn.Parameter], gates: list[nn.Parameter], lr: float, gate_lr: float
) -> torch.optim.Optimizer:
    """AdamW for LoRA (+ head); the gates in their own Adam group, no weight decay (§1.3)."""
    groups: list[dict[str, object]] = [{"params": lora, "lr": lr}]
    if gates:
        groups.append({"params": gates, "lr": gate_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


# -- small side tensors of an activations message ------------------------------------------------


def pack_mask(mask: torch.Tensor) -> PackedTensor:
    """The 0/1 padding mask at 1 bit per token (exact: min-max 0..1 at 1 bit)."""
    return quantize(mask.float(), 1, QuantSpec(granularity=Granularity.TENSOR))


def unpack_mask(p: PackedTensor) -> torch.Tensor:
    m = dequantize(p).round()
    if not bool(((m == 0) | (m == 1)).all()):
        raise FedqError("attention mask must be 0/1")
    return m.long()


def pack_labels(labels: torch.Tensor) -> PackedTensor:
    """Integer labels as float32 (exact below 2^24: class ids, token ids, -100)."""
    return raw(labels.float())


def unpack_labels(p: PackedTensor, low: int, high: int) -> torch.Tensor:
    y = dequantize(p)
    if not bool((y == y.round()).all()) or not bool(
        ((y == -100) | ((y >= low) & (y < high))).all()
    ):
        raise FedqError(f"labels must be integers in [{low}, {high}) or -100")
    return y.long()
