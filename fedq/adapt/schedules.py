"""Round- and client-driven bit schedules, Ardıç & Genç (IEEE Access 2025; docs/algorithms.md
§2.5-2.6).

- :class:`FixedBits`: one width for every tensor and round (the static 8/12/16-bit ablations).
- :class:`CosineBits`: the global schedule, cosine annealing from ``b_max`` down to ``b_min`` over
  the run, so early (large, noisy) updates travel at full precision and late ones cheaply (§2.5).
- :class:`ClientEntropyBits`: the cosine schedule scaled by a client importance ``nu`` made of label
  entropy and relative data size, so few-class or small clients upload fewer bits (§2.6).

All three give every tensor of a message the same width, as the reference code does. Rounding is
Python's ``round`` (half to even), as the reference's ``int(round(b))`` (FL_DPQS ``client.py``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedq.adapt.base import MAX_BITS, BitContext, check_bit_range
from fedq.errors import ConfigError


def cosine_factor(t: int, total: int) -> float:
    """``0.5 * (1 + cos(pi * t / T))``: 1 at t=0, 0.5 at t=T/2, 0 at t=T (§2.5)."""
    return 0.5 * (1.0 + math.cos(math.pi * t / total))


def label_entropy(counts: Sequence[int]) -> float:
    """Shannon entropy in bits, ``-sum p_k log2 p_k``, of a label histogram (0 for an empty one)."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in counts if c > 0)


def normalized_label_entropy(counts: Sequence[int]) -> float:
    """``H / H_max`` with ``H_max = log2 K``, K = number of classes (§2.6).

    With K = 1 every client is as balanced as it can be, so the ratio is 1 (0/0 otherwise).
    """
    if len(counts) <= 1:
        return 1.0
    return label_entropy(counts) / math.log2(len(counts))


def client_importance(ctx: BitContext, *, w_h: float = 0.5, w_s: float = 0.5) -> float:
    """``nu = w_h * H/H_max + w_s * n_i/n_max`` (§2.6; FL_DPQS ``compute_homogeneity_score``).

    Needs ``ctx.label_counts`` and ``ctx.max_samples``; raises :class:`ConfigError` without them.
    """
    if not ctx.label_counts or ctx.max_samples <= 0:
        raise ConfigError("client importance needs label_counts and max_samples in the BitContext")
    size = ctx.num_samples / ctx.max_samples
    return w_h * normalized_label_entropy(ctx.label_counts) + w_s * size


def _clamp_round(value: float, b_min: int, b_max: int) -> int:
    return max(b_min, min(b_max, round(value)))


class _UniformSchedule(abc.ABC):
    """A stateless policy that gives every tensor of a round the same width."""

    @abc.abstractmethod
    def bits_at(self, ctx: BitContext) -> int:
        """The width for this round (and client)."""

    def choose(self, tensors: Mapping[str, torch.Tensor], ctx: BitContext) -> dict[str, int]:
        return dict.fromkeys(tensors, self.bits_at(ctx))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class FixedBits(_UniformSchedule):
    """The same width for every tensor in every round (static-bit baselines, §2.2 run 5)."""

    name = "fixed"

    def __init__(self, bits: int = 8) -> None:
        check_bit_range(bits, bits)
        self.bits = bits

    def bits_at(self, ctx: BitContext) -> int:
        return self.bits


class CosineBits(_UniformSchedule):
    """Round-based cosine annealing (§2.5): ``b(t) = round(b_min + (b_max-b_min) * cosine_factor)``.

    Defaults are the paper's MNIST/CIFAR10 values (32 -> 8); the medical runs use ``b_min = 12``.
    """

    name = "cosine"

    def __init__(self, b_max: int = 32, b_min: int = 8) -> None:
        check_bit_range(b_min, b_max)
        self.b_max = b_max
        self.b_min = b_min

    def bits_at(self, ctx: BitContext) -> int:
        f = cosine_factor(ctx.round, ctx.total_rounds)
        return _clamp_round(self.b_min + (self.b_max - self.b_min) * f, self.b_min, self.b_max)


class ClientEntropyBits(_UniformSchedule):
    """Client-based scheduler (§2.6): ``b = round(b_min + (b_max-b_min) * cosine_factor * nu)``.

    ``nu`` is :func:`client_importance`. Without client information (no ``label_counts``, or
    ``num_samples``/``max_samples`` unknown, i.e. 0, as on the server for the downlink) there is
    nothing to weigh, so it degrades to :class:`CosineBits` with the same ``b_min``/``b_max``.
    The paper fixes ``b_max = 32``; it is a parameter here so the schedule can start lower.
    """

    name = "client_entropy"

    def __init__(
        self, b_min: int = 8, b_max: int = MAX_BITS, w_h: float = 0.5, w_s: float = 0.5
    ) -> None:
        check_bit_range(b_min, b_max)
        problems = [
            f"{key} must be a finite number >= 0, got {value!r}"
            for key, value in (("w_h", w_h), ("w_s", w_s))
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0
        ]
        if not problems and w_h + w_s > 1.0 + 1e-9:
            problems.append(f"w_h + w_s must be <= 1 so that nu <= 1, got {w_h + w_s}")
        if problems:
            raise ConfigError(problems)
        self.b_min, self.b_max, self.w_h, self.w_s = b_min, b_max, float(w_h), float(w_s)
        self._cosine = CosineBits(b_max=b_max, b_min=b_min)

    @staticmethod
    def has_client_info(ctx: BitContext) -> bool:
        return bool(ctx.label_counts) and ctx.num_samples > 0 and ctx.max_samples > 0

    def bits_at(self, ctx: BitContext) -> int:
        if not self.has_client_info(ctx):
            return self._cosine.bits_at(ctx)
        nu = client_importance(ctx, w_h=self.w_h, w_s=self.w_s)
        f = cosine_factor(ctx.round, ctx.total_rounds)
        return _clamp_round(self.b_min + (self.b_max - self.b_min) * f * nu, self.b_min, self.b_max)
