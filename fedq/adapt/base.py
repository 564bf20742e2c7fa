"""What every bit policy sees and returns: :class:`BitContext` in, ``{tensor name: bits}`` out.

A policy answers one question per message: "how many bits for each tensor of this update?". Widths
1..8 are packed by :mod:`fedq.codec`; a width above 8 means "send uncompressed" (9..16 -> fp16,
17..32 -> fp32), a mapping the compressor applies. Policies only return integers capped at
:data:`MAX_BITS`, so the same policy object serves the uplink (client) and the downlink (server).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedq.errors import ConfigError

#: Widest width a policy may return (fp32, "uncompressed").
MAX_BITS = 32
#: Widest width the codec packs; above it the compressor sends fp16 / fp32.
MAX_PACKED_BITS = 8


@dataclass(frozen=True, slots=True)
class BitContext:
    """Round and client facts a policy may use (Ardıç & Genç, docs/algorithms.md §2.5-2.6).

    ``num_samples``, ``max_samples`` and ``label_counts`` are the client-side inputs of the entropy
    scheduler; they stay at their defaults on the server (downlink), where no client data is known.
    ``round`` may equal ``total_rounds`` (the end point of the cosine schedule, ``b = b_min``).
    """

    round: int
    total_rounds: int
    num_samples: int = 0
    max_samples: int = 0
    label_counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.total_rounds < 1:
            problems.append(f"total_rounds must be >= 1, got {self.total_rounds}")
        if not 0 <= self.round <= self.total_rounds:
            problems.append(
                f"round must be in 0..total_rounds={self.total_rounds}, got {self.round}"
            )
        if self.num_samples < 0 or self.max_samples < 0:
            problems.append(
                f"sample counts must be >= 0, got num_samples={self.num_samples}, "
                f"max_samples={self.max_samples}"
            )
        if self.max_samples and self.num_samples > self.max_samples:
            problems.append(
                f"num_samples={self.num_samples} exceeds max_samples={self.max_samples} "
                "(n_max is the largest count among this round's selected clients)"
            )
        if any(c < 0 for c in self.label_counts):
            problems.append(f"label_counts must be >= 0, got {list(self.label_counts)}")
        if problems:
            raise ConfigError(problems)


class BitPolicy(Protocol):
    """Chooses an integer bit-width per tensor name; state is checkpointed with the run."""

    name: str

    def choose(self, tensors: Mapping[str, torch.Tensor], ctx: BitContext) -> dict[str, int]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_bit_range(b_min: int, b_max: int, *, upper: int = MAX_BITS) -> None:
    """Validate ``1 <= b_min <= b_max <= upper`` (integers), listing every problem at once."""
    problems = []
    for key, value in (("b_min", b_min), ("b_max", b_max)):
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key} must be an integer, got {value!r}")
    if not problems:
        if not 1 <= b_min <= upper:
            problems.append(f"b_min must be in 1..{upper}, got {b_min}")
        if not 1 <= b_max <= upper:
            problems.append(f"b_max must be in 1..{upper}, got {b_max}")
        if b_min > b_max:
            problems.append(f"b_min ({b_min}) must be <= b_max ({b_max})")
    if problems:
        raise ConfigError(problems)
