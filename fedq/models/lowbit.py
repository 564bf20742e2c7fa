"""A frozen base held in fedq's packed low-bit format (``model.base_bits``).

Every frozen ``nn.Linear`` of a model (PEFT's LoRA layers keep theirs as ``base_layer``) is
replaced by a :class:`PackedLinear`: its weight quantized once with fedq's codec (one scale and
offset per group of ``group_size`` values along each row, the least-error clip per group, at a
fixed width) and kept only as the packed tensor. Each forward decodes the weight for that one
matrix multiply through the codec's dispatch (the Triton kernels on CUDA, not yet run on a GPU;
the torch path elsewhere) and drops it; the backward pass decodes it again for the input's
gradient, so no fp32 copy of a weight outlives the layer's call. LoRA, norms, embeddings and the
(tied) LM head stay as they are. The choices: docs/algorithms.md §6.7.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedq.codec import Granularity, PackedTensor, QuantSpec, dequantize, quantize
from fedq.errors import ConfigError

#: Linear layers left in full precision whatever ``base_bits`` says (the LM head is often tied
#: to the input embeddings, which stay as they are).
KEEP = ("lm_head",)


class _PackedMatmul(torch.autograd.Function):
    """``x @ W.T + b`` with ``W`` decoded from the layer's packed weight in forward and again in
    backward (nothing of ``W`` is saved for backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.weight_like(x), layer.bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g @ ctx.layer.weight_like(g), None


class PackedLinear(nn.Module):
    """A frozen linear layer whose weight lives packed (module docstring)."""

    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, bits: int, group_size: int = 64) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ConfigError(f"model.base_bits: must be in 2..8, got {bits}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits = bits
        spec = QuantSpec(granularity=Granularity.GROUP, group_size=group_size, range="mse")
        self.packed: PackedTensor = quantize(linear.weight.detach().float().cpu(), bits, spec)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._device = linear.weight.device

    def weight_like(self, x: torch.Tensor) -> torch.Tensor:
        """The decoded weight, on ``x``'s device and in its dtype."""
        return dequantize(self.packed, device=x.device).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a fresh tensor; for code that inspects a layer, not for forward)."""
        return dequantize(self.packed, device=self._device)

    def packed_nbytes(self) -> int:
        return int(self.packed.payload_nbytes + self.packed.metadata_nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PackedMatmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


def quantize_base(model: nn.Module, bits: int, group_size: int = 64) -> dict[str, int]:
    """Replace every frozen ``nn.Linear`` of ``model`` (not those named in :data:`KEEP`, not
    trainable ones such as LoRA's A and B) by a :class:`PackedLinear`; returns ``{"layers": n,
    "fp32_bytes": ..., "packed_bytes": ...}`` of what was replaced."""
    swaps: list[tuple[nn.Module, str, nn.Linear]] = []
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if (
                type(child) is nn.Linear
                and not child.weight.requires_grad
                and not any(full.endswith(k) or f"{k}." in full for k in KEEP)
            ):
                swaps.append((parent, child_name, child))
    fp32 = packed = 0
    for parent, child_name, child in swaps:
        layer = PackedLinear(child, bits, group_size)
        fp32 += child.weight.numel() * 4
        packed += layer.packed_nbytes()
        setattr(parent, child_name, layer)
    return {"layers": len(swaps), "fp32_bytes": fp32, "packed_bytes": packed}
