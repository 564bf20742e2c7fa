"""One interface for the codec of a split-learning cut: the sender and the receiver of one
direction (activations up, gradients down) at one boundary.

The split step (:mod:`fedq.split.protocol`) only ever calls this interface, so a codec is added
by registering it (:data:`fedq.adapt.registry.CUT_CODECS`), never by a branch in the step:

- sender: :meth:`CutCodec.send` codes a tensor and returns :class:`Coded` (the value the sender's
  graph continues with, which is bit for bit what the receiver decodes, and the wire tensors);
  :meth:`CutCodec.settle` tells a stateful codec whether the peer took the step.
- receiver: :meth:`CutCodec.receiver` makes a :class:`CutReceiver`, which decodes the wire tensors
  of one peer and settles its own state the same way.
- state: a codec is an ``nn.Module``; its gates are parameters and everything else it must carry
  over a restart (rounding generator, per-example memories) is its extra state, so
  ``state_dict()`` is the whole checkpoint of a codec.

The coding step itself is the federated :class:`~fedq.codec.Compressor` family's (a codec holds a
:class:`~fedq.codec.QuantCompressor` or an :class:`~fedq.codec.IdentityCompressor`); what a cut
codec adds is the training signal through the quantizer, the gradient direction and per-peer
state.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fedq.codec import Compressor, PackedTensor, dequantize
from fedq.errors import FedqError

Direction = Literal["act", "grad"]
#: Wire name of the coded tensor of each direction.
WIRE_NAME: dict[str, str] = {"act": "h", "grad": "g"}


@dataclass(slots=True)
class Coded:
    """What a sender puts on the wire for one step, and what it keeps."""

    value: torch.Tensor  # what the receiver will decode; carries the sender's training path
    tensors: dict[str, PackedTensor]  # the wire tensors of this direction
    stats: dict[str, float] = field(default_factory=dict)
    pending: Any = None  # a stateful codec's update, applied by ``settle(ok=True)``


@dataclass(slots=True)
class Received:
    """What a receiver decoded from one step's wire tensors."""

    value: torch.Tensor
    pending: Any = None


class CutReceiver:
    """Decodes one direction's wire tensors from any peer (stateless: a plain ``dequantize``)."""

    def __init__(self, direction: Direction) -> None:
        self.name = WIRE_NAME[direction]

    @property
    def wire_names(self) -> frozenset[str]:
        return frozenset({self.name})

    def receive(
        self, tensors: Mapping[str, PackedTensor], peer: str, device: torch.device | str
    ) -> Received:
        value = dequantize(tensors[self.name], device=device).float()
        if not bool(torch.isfinite(value).all()):
            raise FedqError(f"{self.name!r} from {peer} decodes to NaN/Inf")
        return Received(value)

    def settle(self, peer: str, received: Received, ok: bool) -> None:
        """Called once the step that used ``received`` has (``ok``) or has not gone through."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


class CutCodec(nn.Module, abc.ABC):
    """Sender of one direction at one boundary (module docstring). Subclasses implement
    :meth:`encode`, :meth:`forward_encode` (activations: fake-quantize with a training signal) and
    :meth:`quantize_gradient` (gradients: code and train the gates on a distortion proxy)."""

    name: ClassVar[str]
    #: Directions this codec can code.
    directions: ClassVar[tuple[Direction, ...]] = ("act", "grad")
    compressor: Compressor

    def __init__(self, direction: Direction = "act") -> None:
        super().__init__()
        if direction not in self.directions:
            raise FedqError(f"cut codec {self.name!r} cannot code direction {direction!r}")
        self.direction: Direction = direction

    # -- coding (subclasses) ---------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> PackedTensor:
        """The packed tensor sent for ``x`` (no training signal)."""

    @abc.abstractmethod
    def forward_encode(self, x: torch.Tensor) -> tuple[torch.Tensor, PackedTensor]:
        """``(x_hat, packed)``: ``x_hat`` equals ``dequantize(packed)`` in value and carries the
        activation direction's training signal (straight-through into ``x``, gates)."""

    @abc.abstractmethod
    def quantize_gradient(self, g: torch.Tensor) -> tuple[torch.Tensor, PackedTensor, float]:
        """``(g_hat, packed, relative squared error)``; learned codecs also accumulate their
        gates' distortion-proxy gradient here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_encode(x)[0]

    # -- the step's interface --------------------------------------------------------------------
    def send(self, x: torch.Tensor, ids: Sequence[int] | None = None) -> Coded:
        """Code ``x`` (``ids``: the batch's example ids, for codecs that keep per-example
        state)."""
        wire = WIRE_NAME[self.direction]
        if self.direction == "act":
            x_hat, p = self.forward_encode(x)
            return Coded(x_hat, {wire: p})
        g_hat, p, err = self.quantize_gradient(x)
        return Coded(g_hat, {wire: p}, {"rel_err": err})

    def settle(self, coded: Coded, ok: bool) -> None:
        """Called once the peer has (``ok``) or has not taken the step ``coded`` was sent in."""
        return None

    @classmethod
    def receiver(cls, direction: Direction) -> CutReceiver:
        """The receiving side of this codec for one direction."""
        return CutReceiver(direction)

    def int_bits(self) -> torch.Tensor | None:
        """The integer bit map sent per channel (learned codecs), else None."""
        return None

    def bit_stats(self) -> dict[str, float] | None:
        """Mean / min / max of :meth:`int_bits` (None for codecs without a learned map)."""
        bits = self.int_bits()
        if bits is None:
            return None
        b = bits.float()
        return {"mean": float(b.mean()), "min": float(b.min()), "max": float(b.max())}

    # -- checkpoint ------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"compressor": self.compressor.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        self.compressor.load_state_dict(dict(state).get("compressor", {}))
