"""AQ-SGD baseline: send the quantized *change* of each training example's activation.

Wang et al., "Fine-tuning Language Models over Slow Networks using Activation Compression with
Guarantees" (NeurIPS 2022; docs/algorithms.md §1.7). Both parties keep, per training example ``i``,
the activation ``m_i`` they last agreed on. For a batch the sender transmits ``Q(a_i - m_i)``,
and both sides set ``m_i += dequantize(Q(a_i - m_i))``; the receiver's activation is that new
``m_i``. As the model changes slowly between two visits of one example, the change is much
smaller than the activation, so the same bits code it with far less error. Gradients are
quantized directly (the split runtime's fixed codec).

Measured results: BENCHMARKS.md, "Split learning" (AQ-SGD rows).

fedq's choices where the paper leaves things open (docs/algorithms.md §5.24): a first visit codes
the activation itself against zero; each example's copy keeps the longest sequence seen; both
sides commit only once a step has gone through, against versions the sender names (``ids`` and
``ref`` beside the codes), so copies out of step are an error naming the example, never a silent
mis-decode, and a failed step makes both sides start that batch's examples afresh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedq.adapt.amaq import FixedQuantizer
from fedq.adapt.cut import Coded, CutReceiver, Direction, Received
from fedq.codec import PackedTensor, dequantize, raw
from fedq.errors import FedqError

#: Largest example id / version a message may carry (sent as float32, exact below 2**24).
MAX_ID = 2**24


class ActivationMemory:
    """``m_i`` per training example (one party's copy) with a version, the number of changes
    committed to it: the sender names the version it coded against, so a receiver whose copy
    differs (a lost message) fails loudly instead of decoding garbage."""

    def __init__(self) -> None:
        self._m: dict[int, tuple[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._m)

    def versions(self, ids: Sequence[int]) -> list[int]:
        """The version held for each id (0: never seen)."""
        return [self._m[int(i)][0] if int(i) in self._m else 0 for i in ids]

    def reference(
        self, ids: Sequence[int], versions: Sequence[int], length: int, hidden: int
    ) -> torch.Tensor:
        """``[B, length, hidden]`` float32: each id's ``m`` at ``versions`` (zeros for 0), cut
        or zero-padded to ``length``. Raises :class:`FedqError` if a version is not the one
        held."""
        out = torch.zeros(len(ids), length, hidden)
        for row, (i, v) in enumerate(zip(ids, versions, strict=True)):
            if v == 0:
                continue
            held = self._m.get(int(i))
            if held is None or held[0] != v:
                have = 0 if held is None else held[0]
                raise FedqError(
                    f"AQ-SGD: example {int(i)} coded against version {v}, this side holds "
                    f"{have}; the two copies are out of step"
                )
            m = held[1]
            n = min(length, m.shape[0])
            out[row, :n] = m[:n]
        return out

    def commit(self, ids: Sequence[int], versions: Sequence[int], value: torch.Tensor) -> None:
        """Store ``value[b]`` (``[B, T, d]``, the new agreed activation) as version
        ``versions[b] + 1`` of each id (rows in order: a repeated id keeps its last row); rows
        beyond ``T`` of a longer earlier visit are kept."""
        v = value.detach().float().cpu()
        for row, (i, ver) in enumerate(zip(ids, versions, strict=True)):
            new = v[row].clone()
            old = self._m.get(int(i))
            if old is not None and old[1].shape[0] > new.shape[0]:  # keep the longer tail
                new = torch.cat([new, old[1][new.shape[0] :]])
            self._m[int(i)] = (int(ver) + 1, new)

    def forget(self, ids: Sequence[int]) -> None:
        """Drop these ids: their next visit is coded against zero with version 0, which the
        other side takes as a fresh start whatever it holds."""
        for i in ids:
            self._m.pop(int(i), None)

    def state_dict(self) -> dict[str, Any]:
        ids = sorted(self._m)
        return {
            "ids": ids,
            "versions": [self._m[i][0] for i in ids],
            "values": [self._m[i][1].clone() for i in ids],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ids, versions, values = state["ids"], state["versions"], state["values"]
        if not len(ids) == len(versions) == len(values):
            raise FedqError("AQ-SGD memory state: ids, versions and values differ in length")
        rows = zip(ids, versions, values, strict=True)
        self._m = {int(i): (int(v), t.clone()) for i, v, t in rows}


@dataclass(frozen=True)
class PendingCommit:
    """What the sender commits once the receiver has taken the step."""

    ids: list[int]
    versions: list[int]
    value: torch.Tensor


def pack_ids(values: Sequence[int]) -> PackedTensor:
    """Example ids or versions as float32 (exact below :data:`MAX_ID`)."""
    return raw(torch.tensor([float(v) for v in values]))


def unpack_ids(p: PackedTensor, count: int, what: str) -> list[int]:
    """``count`` integers in ``[0, MAX_ID)`` from :func:`pack_ids`; FedqError otherwise."""
    v = dequantize(p)
    bad = tuple(p.shape) != (count,) or not bool((v == v.round()).all())
    if bad or bool(((v < 0) | (v >= MAX_ID)).any()):
        raise FedqError(f"AQ-SGD {what} must be one non-negative integer per example (< {MAX_ID})")
    return [int(x) for x in v.tolist()]


class DeltaQuantizer(FixedQuantizer):
    """The sender's side of AQ-SGD at ``bits`` per value: :meth:`send` with the batch's example
    ids codes the change against its :class:`ActivationMemory` and adds ``ids`` / ``ref`` to the
    wire tensors; ``forward`` / ``forward_encode`` (no ids: evaluation) code the activation itself,
    as the fixed codec does."""

    name = "aqsgd"
    directions: ClassVar[tuple[Direction, ...]] = ("act",)

    def __init__(self, bits: float, **kwargs: Any) -> None:
        super().__init__(bits, **kwargs)
        self.memory = ActivationMemory()

    def send(self, x: torch.Tensor, ids: Sequence[int] | None = None) -> Coded:
        if ids is None:
            return super().send(x)
        x_hat, p, pending = self.forward_encode_delta(x, ids)
        tensors = {"h": p, "ids": pack_ids(pending.ids), "ref": pack_ids(pending.versions)}
        return Coded(x_hat, tensors, pending=pending)

    def settle(self, coded: Coded, ok: bool) -> None:
        """Commit the batch once the receiver has it; otherwise forget its examples, since the
        receiver may or may not have committed: both then start them afresh."""
        pending = coded.pending
        if not isinstance(pending, PendingCommit):
            return
        if ok:
            self.commit(pending)
        else:
            self.memory.forget(pending.ids)

    @classmethod
    def receiver(cls, direction: Direction) -> CutReceiver:
        return DeltaReceiver(direction)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "memory": self.memory.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.memory.load_state_dict(dict(state)["memory"])

    def forward_encode_delta(
        self, x: torch.Tensor, ids: Sequence[int]
    ) -> tuple[torch.Tensor, PackedTensor, PendingCommit]:
        """``(m + dequantize(p), p, pending)`` with ``p`` the coded ``x - m``; call
        ``memory.commit`` with ``pending`` once the step has gone through."""
        ids = [int(i) for i in ids]
        versions = self.memory.versions(ids)
        m = self.memory.reference(ids, versions, x.shape[1], x.shape[2]).to(x.device)
        p = self.encode(x.detach().float() - m)
        agreed = m + dequantize(p, device=x.device).float()
        out = agreed
        if x.requires_grad:  # straight-through: identity into x, zero in value
            out = agreed + (x.float() - x.detach().float())
        return out.to(x.dtype), p, PendingCommit(ids, versions, agreed)

    def commit(self, pending: PendingCommit) -> None:
        self.memory.commit(pending.ids, pending.versions, pending.value)


def decode_delta(
    memory: ActivationMemory,
    ids: Sequence[int],
    versions: Sequence[int],
    p: PackedTensor,
    device: torch.device | str,
) -> tuple[torch.Tensor, PendingCommit]:
    """The receiver's side: ``m + dequantize(p)`` for the batch's ids and the commit to make
    once the step has gone through; the same float32 operations as
    :meth:`DeltaQuantizer.forward_encode_delta`."""
    _, length, hidden = p.shape
    m = memory.reference(ids, versions, length, hidden).to(device)
    agreed = m + dequantize(p, device=device).float()
    return agreed, PendingCommit([int(i) for i in ids], [int(v) for v in versions], agreed)


class DeltaReceiver(CutReceiver):
    """The receiver's side of AQ-SGD: one :class:`ActivationMemory` per peer."""

    def __init__(self, direction: Direction) -> None:
        super().__init__(direction)
        self.memories: dict[str, ActivationMemory] = {}

    @property
    def wire_names(self) -> frozenset[str]:
        return frozenset({self.name, "ids", "ref"})

    def receive(
        self, tensors: Mapping[str, PackedTensor], peer: str, device: torch.device | str
    ) -> Received:
        p = tensors[self.name]
        if len(p.shape) != 3:
            raise FedqError(f"AQ-SGD activations must be [B, T, d], got {list(p.shape)}")
        ids = unpack_ids(tensors["ids"], p.shape[0], "ids")
        ref = unpack_ids(tensors["ref"], p.shape[0], "ref")
        memory = self.memories.setdefault(peer, ActivationMemory())
        value, pending = decode_delta(memory, ids, ref, p, device)
        if not bool(torch.isfinite(value).all()):
            raise FedqError(f"activations from {peer} decode to NaN/Inf")
        return Received(value, pending)

    def settle(self, peer: str, received: Received, ok: bool) -> None:
        pending = received.pending
        if ok and isinstance(pending, PendingCommit):
            self.memories[peer].commit(pending.ids, pending.versions, pending.value)

    def state_dict(self) -> dict[str, Any]:
        return {"memories": {peer: m.state_dict() for peer, m in self.memories.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memories = {}
        for peer, ms in dict(state.get("memories", {})).items():
            self.memories[str(peer)] = memory = ActivationMemory()
            memory.load_state_dict(ms)
