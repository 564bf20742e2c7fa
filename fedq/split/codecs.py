"""The codecs, bit schedule, gate controller and optimizer of each split party, built from the
``split:`` and ``train:`` sections.

Who holds what (docs/algorithms.md §1.6): the sender of a tensor owns its codec, so the client
holds the activation codec at the cut and the server the gradient codec; each receiver decodes
with the codec's :class:`~fedq.adapt.cut.CutReceiver`. In all-boundaries mode every inner
boundary gets both (simulated in process, see :class:`~fedq.split.models.SimulatedBoundary`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedq.adapt import CUT_CODECS, BitSchedule, CutCodec, CutReceiver, GateController
from fedq.adapt.cut import Direction
from fedq.adapt.registry import make_cut_codec
from fedq.codec import Granularity, PackedTensor, QuantSpec, dequantize, quantize, raw
from fedq.config import RunConfig, SplitConfig, TrainConfig
from fedq.errors import FedqError
from fedq.models.optim import make_optimizer
from fedq.split.budget import CutBudget
from fedq.split.models import SimulatedBoundary


def make_codec(sc: SplitConfig, direction: Direction, width: int, seed: int = 0) -> CutCodec:
    """The sender's codec for one boundary and direction (``act_codec`` / ``grad_codec``); ``seed``
    seeds the gradient direction's stochastic rounding."""
    return make_cut_codec(
        sc.act_codec if direction == "act" else sc.grad_codec,
        direction,
        width=width,
        seed=seed,
        fixed_bits=sc.fixed_bits,
        quant_range=sc.quant_range,
        outlier_ratio=sc.act_outlier_ratio,
        b_min=sc.b_min,
        b_max=sc.b_max,
        init_bits=sc.init_bits,
        gate_signal=sc.act_gate_signal,
    )


def make_receiver(sc: SplitConfig, direction: Direction) -> CutReceiver:
    """The receiving side of the codec configured for ``direction``."""
    name = sc.act_codec if direction == "act" else sc.grad_codec
    return CUT_CODECS[name].receiver(direction)


def boundary_factory(sc: SplitConfig, width: int) -> Callable[[], SimulatedBoundary] | None:
    """A zero-argument callable making inner :class:`SimulatedBoundary` objects, or None."""
    if not sc.all_boundaries:
        return None

    made = [0]

    def make() -> SimulatedBoundary:
        made[0] += 1  # a distinct stochastic-rounding stream per inner boundary
        return SimulatedBoundary(
            make_codec(sc, "act", width), make_codec(sc, "grad", width, seed=made[0])
        )

    return make


def bit_schedule(sc: SplitConfig, total_steps: int) -> BitSchedule:
    return BitSchedule(
        target_bits=sc.target_bits,
        start_bits=sc.init_bits,
        warmup_steps=max(1, round(sc.warmup_fraction * total_steps)),
    )


def cut_budget(cfg: RunConfig) -> CutBudget | None:
    """The server's byte account of the run (``split.budget_bytes``), or None without one. Its
    steps are the server's: every selected client's ``local_steps`` in every round."""
    sc = cfg.split
    if sc.budget_bytes <= 0:
        return None
    steps = cfg.rounds.count * cfg.rounds.clients_per_round * sc.local_steps
    return CutBudget(
        total_bytes=float(sc.budget_bytes),
        total_steps=steps,
        start_bits=sc.init_bits,
        warmup_steps=max(1, round(sc.warmup_fraction * steps)) if sc.warmup_fraction > 0 else 0,
        b_min=sc.b_min,
        b_max=sc.b_max,
    )


def gate_controller(
    sc: SplitConfig, groups: Sequence[Sequence[nn.Module]], schedule: BitSchedule
) -> GateController | None:
    """The party's :class:`GateController` over its groups (one per direction); None without
    learned codecs."""
    ctl = GateController(groups, schedule, sc.gate_lr)
    return ctl if ctl.groups else None


def lora_optimizer(params: list[nn.Parameter], tc: TrainConfig) -> torch.optim.Optimizer:
    """``train``'s optimizer over a party's LoRA (+ head); the gates have their own controller."""
    assert tc.optimizer is not None and tc.weight_decay is not None  # resolved at load
    return make_optimizer(
        params, tc.optimizer, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay
    )


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
