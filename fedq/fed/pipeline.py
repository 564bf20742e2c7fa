"""The coding of a tensor dict for one link: bit policy -> compressor (+ error feedback) ->
PackedTensor bundle, and back.

It is the last part of the one fixed order (docs/algorithms.md §5.26): update -> privacy -> bit
policy -> compressor. Privacy is applied before this module sees the update: the client
(:mod:`fedq.fed.client`) passes it through its mechanism's ``privatize``
(:mod:`fedq.fed.privacy`: clipping, and noise where the client adds it) and then calls
:meth:`LinkCodec.encode`; central DP noises the aggregate on the server. Noise comes before
quantization, so quantization is post-processing and costs no privacy. ``LinkCodec`` holds one
party's state for one direction (bit-policy state, error-feedback residuals, stochastic-rounding
RNG), all checkpointable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedq.adapt import BitContext, BitPolicy, make_policy
from fedq.codec import (
    Compressor,
    ErrorFeedback,
    Granularity,
    IdentityCompressor,
    PackedTensor,
    QuantCompressor,
    QuantSpec,
)
from fedq.config import LinkConfig


@dataclass(frozen=True, slots=True)
class EncodeStats:
    numel: int
    mean_bits: float  # numel-weighted bits per element as sent (raw fp32 counts 32)
    fp32_bytes: int  # what the same tensors cost as raw fp32 payload


def quant_spec(link: LinkConfig) -> QuantSpec:
    return QuantSpec(
        granularity=Granularity(link.granularity),
        axis=0,
        group_size=link.group_size,
        symmetric=link.symmetric,
        stochastic=link.stochastic,
        scale_dtype=link.scale_dtype,
    )


def make_bit_policy(link: LinkConfig) -> BitPolicy | None:
    if link.policy == "none":
        return None
    if link.policy == "fixed":
        return make_policy("fixed", bits=link.bits)
    if link.policy in ("cosine", "client_entropy"):
        return make_policy(link.policy, b_min=link.b_min, b_max=link.b_max)
    return make_policy(
        "budget",
        bytes_per_round=link.budget_bytes,
        b_min=link.b_min,
        b_max=min(link.b_max, 8),
        spec=quant_spec(link),
    )


class LinkCodec:
    """Bit policy + compressor for one direction of one party (a client's uplink, the server's
    downlink)."""

    def __init__(self, link: LinkConfig, *, seed: int = 0) -> None:
        self.link = link
        self.policy = make_bit_policy(link)
        inner: Compressor = (
            IdentityCompressor()
            if self.policy is None
            else QuantCompressor(quant_spec(link), seed=seed)
        )
        self.compressor: Compressor = (
            ErrorFeedback(inner) if link.error_feedback and self.policy is not None else inner
        )

    def encode(
        self, tensors: Mapping[str, torch.Tensor], ctx: BitContext
    ) -> tuple[dict[str, PackedTensor], EncodeStats]:
        bits = {k: 32 for k in tensors} if self.policy is None else self.policy.choose(tensors, ctx)
        out: dict[str, PackedTensor] = {}
        numel = 0
        bit_sum = 0.0
        for name, x in tensors.items():
            p = self.compressor.compress(name, x, bits[name])
            out[name] = p
            numel += x.numel()
            bit_sum += p.mean_bits() * x.numel()
        return out, EncodeStats(numel, bit_sum / max(numel, 1), 4 * numel)

    def decode(self, packed: Mapping[str, PackedTensor]) -> dict[str, torch.Tensor]:
        return {k: self.compressor.decompress(p) for k, p in packed.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "compressor": self.compressor.state_dict(),
            "policy": self.policy.state_dict() if self.policy is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.compressor.load_state_dict(state.get("compressor", {}))
        if self.policy is not None:
            self.policy.load_state_dict(state.get("policy", {}))
