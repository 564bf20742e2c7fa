"""A run-level byte budget for the cut (``split.budget_bytes``): the bits AMAQ sends at each step
are chosen so that the whole run's cut traffic, as the transport counts it, comes to the budget.

What a split run costs a user is the bytes of all its steps, warm-up included: with the plain
schedule (``init_bits`` down to ``target_bits`` over ``warmup_fraction`` of the steps) an AMAQ-2
run averages well over 2 bits. Here the server, which sees every step's messages both ways (the
activations it receives and the gradients it sends, their sizes as framed on the wire), keeps the
account and plans the rest of the run after every step (docs/algorithms.md §7.1):

- every step spends ``overhead + 2 * numel * b / 8`` bytes at ``b`` bits per value in each
  direction; ``overhead`` (headers, scales, bit maps, row scales, outlier rows, mask, labels) and
  ``numel`` are the run's means so far, measured;
- the bits follow the schedule's ramp from ``init_bits`` to a level ``L`` over the warm-up, then
  ``L``; ``L`` is solved so that the remaining steps spend exactly the remaining bytes. Where the
  warm-up alone would leave less than ``b_min`` after it, the warm-up is shortened, once and for
  the rest of the run, to the longest that leaves ``b_min``; a budget below ``b_min`` bits on every
  step cannot be met, and the run reports that (``budget_level`` stays at ``b_min``).

The next step's target is sent to the client with each gradients message (``act_target_bits``),
and both parties project their gates onto it (:class:`~fedq.adapt.amaq.GateController`), so the
run's total lands within about one step's bytes of the budget (tested at the transport).

Bytes sent in a round that is later discarded stay spent; a resume starts from the account of the
checkpoint it resumes from.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)


def _ramp_sums(s: int, n: int, w: int) -> tuple[float, float]:
    """``(sum(1 - p_j), sum(p_j))`` over steps ``j`` in ``[s, n)`` with ``p_j = min(j / w, 1)``."""
    k = max(n - s, 0)
    if w <= 0:
        return 0.0, float(k)
    e = min(w, n)
    ramp = ((e - 1) * e - (s - 1) * s) / 2 / w if e > s else 0.0
    sum_p = ramp + (n - max(s, e))
    return k - sum_p, sum_p


@dataclass(slots=True)
class CutBudget:
    """The server's account of one run's cut bytes (module docstring)."""

    total_bytes: float
    total_steps: int
    start_bits: float
    warmup_steps: int
    b_min: float
    b_max: float
    spent: float = 0.0  # bytes of the steps taken, both ways
    steps: int = 0  # steps taken
    values: float = 0.0  # values per direction, summed over the steps taken
    overhead: float = 0.0  # bytes beyond the two payloads, summed over the steps taken
    level: float = math.nan  # the bits planned after the warm-up (last plan)
    warned: bool = False

    def record(self, nbytes: float, payload: float, numel: int) -> None:
        """One step: ``nbytes`` both ways as framed, ``payload`` the two coded tensors' packed
        bits, ``numel`` values per direction."""
        self.spent += float(nbytes)
        self.overhead += float(nbytes) - float(payload)
        self.values += float(numel)
        self.steps += 1

    def _level(self, w: int) -> float:
        s, n = self.steps, self.total_steps
        k = n - s
        mean_numel = self.values / self.steps
        bits = 4.0 * (self.total_bytes - self.spent - k * self.overhead / self.steps) / mean_numel
        warm, flat = _ramp_sums(s, n, w)
        if flat <= 0:
            return self.start_bits
        return (bits - self.start_bits * warm) / flat

    def target(self) -> float:
        """Bits per value for the next step (``steps``): the ramp at that step towards the level
        that spends the rest of the budget over the rest of the run."""
        if self.steps == 0 or self.steps >= self.total_steps:
            return self.start_bits
        level = self._level(self.warmup_steps)
        if level < self.b_min and self.warmup_steps > self.steps:
            lo, hi = self.steps, self.warmup_steps  # the longest warm-up that leaves b_min
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._level(mid) >= self.b_min:
                    lo = mid
                else:
                    hi = mid - 1
            self.warmup_steps = lo
            level = self._level(lo)
            log.info("split.budget_bytes: warm-up shortened to %d steps", lo)
        if level < self.b_min - 0.01 and not self.warned:  # (a shortened warm-up leaves b_min)
            self.warned = True
            log.warning(
                "split.budget_bytes=%d is below what the run costs at b_min=%d bits per value "
                "(%.2f bits would be left); it will overspend",
                self.total_bytes,
                self.b_min,
                level,
            )
        self.level = min(max(level, self.b_min), self.b_max)
        p = min(self.steps / self.warmup_steps, 1.0) if self.warmup_steps > 0 else 1.0
        return min(max(self.start_bits * (1 - p) + self.level * p, self.b_min), self.b_max)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
