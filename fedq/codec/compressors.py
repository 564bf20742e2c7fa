"""Compressors: small objects that turn a named tensor into a :class:`PackedTensor` and back.

Following PyTorch's DDP comm hooks, each compressor is a pure coding step plus explicit,
checkpointable state (``state_dict`` / ``load_state_dict``): the stochastic rounding RNG, and for
:class:`ErrorFeedback` the residual per tensor name. :class:`IdentityCompressor` is the parity
reference: it ships the tensor's own bytes, so "identity" and "no compression" give the same model.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from fedq.codec.packed import PackedTensor
from fedq.codec.quantize import QuantSpec, dequantize, quantize, raw
from fedq.errors import CodecError


class Compressor(Protocol):
    def compress(self, name: str, x: torch.Tensor, bits: int | torch.Tensor) -> PackedTensor: ...

    def decompress(self, p: PackedTensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: fp16's largest finite value; wider tensors stay in their own dtype.
_FP16_MAX = 65504.0


def raw_for_bits(x: torch.Tensor, bits: int) -> PackedTensor:
    """Uncompressed encoding for a policy asking for more than 8 bits (the packer's limit).

    9..16 bits travel as fp16 (never fewer bits than asked, and fp16 keeps 11 significant bits);
    17..32 bits, or values beyond fp16's range, travel in the tensor's own dtype. Bit policies
    such as the cosine schedule (docs/algorithms.md §2.5) start at 32 bits; counting their bytes as
    ``numel * b / 8`` for every intermediate b, as the paper does, would claim savings that no
    real packing delivers, so fedq sends (and counts) what it can actually pack.
    """
    fits_fp16 = x.numel() > 0 and float(x.detach().abs().max()) <= _FP16_MAX
    if bits <= 16 and x.dtype == torch.float32 and fits_fp16:
        return raw(x.detach().to(torch.float16))
    return raw(x)


class IdentityCompressor:
    """Lossless: sends the tensor as it is (``bits`` is ignored). The parity reference."""

    def compress(self, name: str, x: torch.Tensor, bits: int | torch.Tensor = 32) -> PackedTensor:
        return raw(x)

    def decompress(self, p: PackedTensor) -> torch.Tensor:
        return dequantize(p)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class QuantCompressor:
    """Fixed-spec quantizer. With ``spec.stochastic`` it owns a seeded generator (checkpointed).

    A bit-width of 9 or more is sent uncompressed, see :func:`raw_for_bits`.
    """

    def __init__(self, spec: QuantSpec | None = None, *, seed: int = 0) -> None:
        self.spec = spec or QuantSpec()
        self.generator = torch.Generator().manual_seed(seed)

    def compress(self, name: str, x: torch.Tensor, bits: int | torch.Tensor) -> PackedTensor:
        if isinstance(bits, int) and bits > 8:
            return raw_for_bits(x, bits)
        gen = self.generator if self.spec.stochastic else None  # off the CPU: draws a noise seed
        try:
            return quantize(x, bits, self.spec, generator=gen)
        except CodecError as e:  # say which tensor: the error travels in a 'failed' report
            raise CodecError(f"tensor {name!r}: {e}") from e

    def decompress(self, p: PackedTensor) -> torch.Tensor:
        return dequantize(p)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            self.generator.set_state(state["rng"])


class ErrorFeedback:
    """Error-feedback wrapper (EF-SGD, Karimireddy et al. 2019): compress ``x + e`` and keep
    ``e <- (x + e) - decode(sent)`` per tensor name, so quantization error is re-sent later
    instead of lost. The residuals are part of the state (checkpointed with the run)."""

    def __init__(self, inner: Compressor) -> None:
        self.inner = inner
        self.residuals: dict[str, torch.Tensor] = {}

    def compress(self, name: str, x: torch.Tensor, bits: int | torch.Tensor) -> PackedTensor:
        corrected = x.float()
        residual = self.residuals.get(name)
        if residual is not None and residual.shape == x.shape:
            corrected = corrected + residual.to(x.device)
        p = self.inner.compress(name, corrected.to(x.dtype), bits)
        self.residuals[name] = (corrected - self.inner.decompress(p).float()).detach()
        return p

    def decompress(self, p: PackedTensor) -> torch.Tensor:
        return self.inner.decompress(p)

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "residuals": {k: v.cpu().clone() for k, v in self.residuals.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self.residuals = {k: v.clone() for k, v in state.get("residuals", {}).items()}
