"""Budgeted allocation: a byte budget per update -> one bit-width per tensor (docs/algorithms.md
§3.3 and §5.36).

This is the discrete counterpart of BAQ's water-filling (``min sum_j s_j 2^{-2R_j}`` s.t. a bit
budget) and of LQ-LoRA's storage-constrained ILP, with the budget in real codec bytes instead of
bits per parameter. The error model is the uniform-quantization noise of the codec's own blocks:

    err_l(b) = sum_blocks len_block * (range_block / (2^b - 1))^2 / 12 = S_l / (2^b - 1)^2

with ``range = max - min`` (asymmetric) or ``2 * absmax`` (symmetric mid-rise levels), the same
step the codec uses (:mod:`fedq.codec.quantize`). Cost is payload ``ceil(numel * b / 8)`` plus
metadata (one bit-map byte, one scale and, asymmetric only, one offset per block).

The allocation is greedy on marginal gain: start every tensor at ``b_min``, then repeatedly add one
bit to the tensor with the largest error reduction per extra byte. A step that does not fit the
remaining budget freezes that tensor; the others continue, so small tensors still use the slack a
large one leaves. ``err_l`` is convex in ``b`` (each extra bit cuts it ~4x for a ~constant cost),
so the gain per byte along one tensor decreases and the greedy order is the water-filling order.
Ties break by tensor name, so the result is deterministic.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from fedq.adapt.base import MAX_PACKED_BITS, BitContext, check_bit_range
from fedq.codec.bitpack import packed_nbytes
from fedq.codec.packed import SCALE_DTYPES
from fedq.codec.quantize import QuantSpec
from fedq.errors import CodecError, ConfigError

log = logging.getLogger(__name__)

#: Bytes per element of an uncompressed tensor at a width above 8 (9..16 -> fp16, 17..32 -> fp32).
_RAW_FP16_MAX_BITS = 16


def metadata_nbytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Metadata of a quantized tensor: per block one bit-map byte, one scale, one offset (asym)."""
    blocks = spec.layout_for(shape).num_blocks
    per_block = 1 + SCALE_DTYPES[spec.scale_dtype].itemsize
    if not spec.symmetric:
        per_block += SCALE_DTYPES[spec.scale_dtype].itemsize
    return blocks * per_block


def tensor_nbytes(shape: tuple[int, ...], bits: int, spec: QuantSpec) -> int:
    """Codec bytes of one tensor at ``bits`` (payload + metadata; raw fp16/fp32 above 8 bits).

    Protobuf framing (names, shapes, field tags) is not included: it does not depend on the bits.
    """
    numel = math.prod(shape)
    if bits > MAX_PACKED_BITS:
        return numel * (2 if bits <= _RAW_FP16_MAX_BITS else 4)
    return packed_nbytes(numel, bits) + metadata_nbytes(shape, spec)


def estimated_bytes(
    tensors: Mapping[str, torch.Tensor], bits: Mapping[str, int], spec: QuantSpec
) -> int:
    """Total codec bytes of ``tensors`` coded at ``bits`` (pure; what the budget is checked on)."""
    return sum(tensor_nbytes(tuple(x.shape), bits[name], spec) for name, x in tensors.items())


def error_weight(x: torch.Tensor, spec: QuantSpec) -> float:
    """``S = sum_blocks len_block * range_block^2 / 12``, so that ``err(b) = S / (2^b - 1)^2``."""
    layout = spec.layout_for(tuple(x.shape))
    if layout.numel == 0:
        return 0.0
    blocks = layout.to_blocks(x.detach()).double()
    if spec.symmetric:
        ranges = 2.0 * blocks.abs().amax(dim=1)
    else:
        lo, hi = torch.aminmax(blocks, dim=1)
        ranges = hi - lo
    lens = layout.block_lengths().to(device=ranges.device, dtype=torch.float64)
    s = float((lens * ranges.square()).sum()) / 12.0
    if not math.isfinite(s):
        raise CodecError("cannot allocate bits for a tensor containing NaN or Inf")
    return s


def estimated_error(
    tensors: Mapping[str, torch.Tensor], bits: Mapping[str, int], spec: QuantSpec
) -> float:
    """Estimated total squared quantization error of ``tensors`` at ``bits`` (0 above 8 bits)."""
    total = 0.0
    for name, x in tensors.items():
        b = bits[name]
        if b <= MAX_PACKED_BITS:
            total += error_weight(x, spec) / float((2**b - 1) ** 2)
    return total


class BudgetBits:
    """Spend ``bytes_per_round`` codec bytes per update where they cut the most error (§3).

    ``spec`` must be the compressor's :class:`QuantSpec` (the default is the codec's default), so
    that blocks, ranges and metadata here are the ones actually sent. Widths stay in the packed
    range 1..8. If even ``b_min`` everywhere exceeds the budget, every tensor gets ``b_min``, a
    warning is logged and :attr:`last_overflow` holds the excess in bytes (0 otherwise).
    """

    name = "budget"

    def __init__(
        self,
        bytes_per_round: int,
        b_min: int = 1,
        b_max: int = MAX_PACKED_BITS,
        spec: QuantSpec | None = None,
    ) -> None:
        check_bit_range(b_min, b_max, upper=MAX_PACKED_BITS)
        if isinstance(bytes_per_round, bool) or not isinstance(bytes_per_round, int):
            raise ConfigError(f"bytes_per_round must be an integer, got {bytes_per_round!r}")
        if bytes_per_round <= 0:
            raise ConfigError(f"bytes_per_round must be > 0, got {bytes_per_round}")
        if spec is not None and not isinstance(spec, QuantSpec):
            raise ConfigError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        self.bytes_per_round = bytes_per_round
        self.b_min, self.b_max = b_min, b_max
        self.spec = spec or QuantSpec()
        self.last_overflow = 0

    def choose(self, tensors: Mapping[str, torch.Tensor], ctx: BitContext) -> dict[str, int]:
        names = sorted(tensors)
        shapes = {n: tuple(tensors[n].shape) for n in names}
        bits = dict.fromkeys(names, self.b_min)
        used = sum(tensor_nbytes(shapes[n], self.b_min, self.spec) for n in names)
        self.last_overflow = max(0, used - self.bytes_per_round)
        if self.last_overflow:
            log.warning(
                "bit budget %d B is below the %d B needed at b_min=%d for every tensor; "
                "sending at b_min (%d B over)",
                self.bytes_per_round,
                used,
                self.b_min,
                self.last_overflow,
            )
            return {n: bits[n] for n in tensors}
        weights = {n: error_weight(tensors[n], self.spec) for n in names}
        heap: list[tuple[float, int, int]] = []
        for i, n in enumerate(names):
            self._push(heap, i, n, bits[n], weights[n], shapes[n])
        while heap:
            _, i, cost = heapq.heappop(heap)
            n = names[i]
            if used + cost > self.bytes_per_round:
                continue  # frozen at its width: its later bits cost about the same and gain less
            used += cost
            bits[n] += 1
            self._push(heap, i, n, bits[n], weights[n], shapes[n])
        return {n: bits[n] for n in tensors}

    def _push(
        self,
        heap: list[tuple[float, int, int]],
        index: int,
        name: str,
        b: int,
        weight: float,
        shape: tuple[int, ...],
    ) -> None:
        """Queue the step ``b -> b + 1`` keyed by minus its gain per byte (zero-gain: never)."""
        if b >= self.b_max:
            return
        gain = weight / float((2**b - 1) ** 2) - weight / float((2 ** (b + 1) - 1) ** 2)
        if gain <= 0.0:
            return
        cost = packed_nbytes(math.prod(shape), b + 1) - packed_nbytes(math.prod(shape), b)
        ratio = math.inf if cost == 0 else gain / cost
        heapq.heappush(heap, (-ratio, index, cost))

    def state_dict(self) -> dict[str, Any]:
        return {"last_overflow": self.last_overflow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_overflow = int(state.get("last_overflow", 0))
