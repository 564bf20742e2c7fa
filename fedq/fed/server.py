"""Server round logic as a plain class (the Ray actor and the gRPC service are thin shells).

A round is all-or-nothing: decoded updates are buffered and validated as they arrive; the global
model changes only in :meth:`FedServer.close_round`, and only when at least ``min_clients`` valid
updates arrived. A malformed, late, duplicate or unexpected update is rejected with a
:class:`~fedq.errors.FedqError` (a gRPC status for the sender) and never touches the model.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from fedq.adapt import BitContext
from fedq.codec import dequantize
from fedq.config import RunConfig
from fedq.errors import FedqError
from fedq.fed.pipeline import LinkCodec
from fedq.fed.privacy import ServerPrivacy
from fedq.fed.strategy import State, make_strategy
from fedq.fed.train import evaluate
from fedq.wire.message import WireMessage

log = logging.getLogger(__name__)


@dataclass
class _Round:
    index: int
    selected: set[str]
    task: WireMessage
    downlink_bits: float
    updates: dict[str, tuple[State, float]] = field(default_factory=dict)
    client_scalars: dict[str, dict[str, float]] = field(default_factory=dict)


def client_name(cid: int) -> str:
    return f"client-{cid}"


class FedServer:
    """Holds the global trainable state, the strategy and the downlink codec; serves tasks and
    collects updates for the current round."""

    def __init__(
        self, cfg: RunConfig, bundle: Any, test_data: Any, client_sizes: list[int]
    ) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.test_data = test_data
        self.client_sizes = client_sizes
        self.strategy = make_strategy(cfg.fed)
        self.downlink = LinkCodec(cfg.compression.downlink, seed=cfg.seed)
        self.privacy = ServerPrivacy(cfg, client_sizes)
        self.global_state: State = {
            k: v.detach().clone() for k, v in bundle.trainable_state().items()
        }
        self.round_done = -1
        self._lock = threading.Lock()
        self._round: _Round | None = None

    # -------------------------------------------------------------- round lifecycle (driver)

    def open_round(self, r: int) -> list[int]:
        """Select this round's clients and encode the downlink once (all selected clients get
        the same bytes). Returns the selected client indices.

        Raises PrivacyBudgetExceeded (nothing selected, nothing charged) when the round would
        exceed the privacy target; otherwise charges the privacy accounting before any release.
        """
        fed = self.cfg.fed
        self.privacy.check_round()
        eligible = self.privacy.eligible()
        ids = self.strategy.select(
            r, fed.num_clients, fed.clients_per_round, self.cfg.seed, eligible
        )
        self.privacy.charge(ids)
        ctx = BitContext(round=r, total_rounds=fed.rounds)
        packed, stats = self.downlink.encode(self.global_state, ctx)
        n_max = max(self.client_sizes[i] for i in ids)
        scalars = {"total_rounds": float(fed.rounds), "max_samples": float(n_max)}
        scalars.update(self.strategy.client_scalars())
        scalars.update(self.privacy.client_scalars())
        tags = {
            "strategy": self.strategy.name,
            "dp_mechanism": self.cfg.privacy.mechanism,
            "laplace_calibration": self.cfg.privacy.laplace_calibration,
        }
        task = WireMessage(
            kind="global",
            client_id="",
            round=r,
            step=0,
            scalars=scalars,
            tags=tags,
            tensors=packed,
        )
        with self._lock:
            self._round = _Round(r, {client_name(i) for i in ids}, task, stats.mean_bits)
        return ids

    def close_round(self) -> dict[str, Any]:
        """Aggregate the round's updates (all or nothing) and evaluate when due."""
        with self._lock:
            rnd, self._round = self._round, None
        if rnd is None:
            raise FedqError("close_round called with no open round")
        received = len(rnd.updates)
        applied = received >= self.cfg.fed.min_clients
        if applied:
            updates = [rnd.updates[c] for c in sorted(rnd.updates)]
            noise_gen = torch.Generator().manual_seed(self.cfg.seed * 7_368_787 + rnd.index)
            mean = self.privacy.aggregate(updates, noise_gen)
            new_state = self.strategy.apply(self.global_state, mean)
            self.global_state = new_state  # swap in one assignment: no half-applied round
            self.round_done = rnd.index
        else:
            log.warning(
                "round %d discarded: %d of %d updates arrived (min_clients=%d)",
                rnd.index,
                received,
                len(rnd.selected),
                self.cfg.fed.min_clients,
            )
        out: dict[str, Any] = {
            "round": rnd.index,
            "clients_selected": len(rnd.selected),
            "clients_ok": received,
            "applied": applied,
            "bits_down": rnd.downlink_bits,
            "epsilon": self.privacy.epsilon(),
        }
        with_loss = [s for s in rnd.client_scalars.values() if "loss" in s]
        if with_loss:
            n = sum(s["num_samples"] for s in with_loss)
            out["train_loss"] = sum(s["loss"] * s["num_samples"] for s in with_loss) / n
        last = rnd.index + 1 == self.cfg.fed.rounds
        if (rnd.index + 1) % self.cfg.fed.eval_every == 0 or last:
            out["accuracy"], out["loss"] = self.evaluate()
        return out

    def evaluate(self) -> tuple[float, float]:
        self.bundle.load_trainable_state(self.global_state)
        return evaluate(self.bundle, self.test_data)

    # -------------------------------------------------------------- transport handler

    def get_task(self, client_id: str, round: int) -> WireMessage:
        with self._lock:
            rnd = self._round
            if rnd is None or rnd.index != round:
                current = None if rnd is None else rnd.index
                raise FedqError(f"no task for round {round} (open round: {current})")
            if client_id not in rnd.selected:
                raise FedqError(f"{client_id} is not selected in round {round}")
            t = rnd.task
        return WireMessage(t.kind, client_id, t.round, t.step, t.scalars, t.tags, t.tensors)

    def push_update(self, msg: WireMessage) -> None:
        """Validate and buffer one client's update; raises FedqError (nothing stored) if bad."""
        with self._lock:
            rnd = self._round
        if rnd is None or msg.round != rnd.index:
            raise FedqError(f"update for round {msg.round} but no such round is open")
        if msg.kind != "update":
            raise FedqError(f"expected an 'update' message, got {msg.kind!r}")
        if msg.client_id not in rnd.selected:
            raise FedqError(f"{msg.client_id} is not selected in round {msg.round}")
        n = msg.scalars.get("num_samples", 0.0)
        if not (math.isfinite(n) and n > 0):
            raise FedqError(f"update from {msg.client_id}: num_samples must be > 0, got {n}")
        expected = self.global_state
        if set(msg.tensors) != set(expected):
            missing = sorted(set(expected) - set(msg.tensors))[:3]
            extra = sorted(set(msg.tensors) - set(expected))[:3]
            raise FedqError(f"update from {msg.client_id}: missing {missing}, unexpected {extra}")
        for k, p in msg.tensors.items():
            if tuple(p.shape) != tuple(expected[k].shape):
                raise FedqError(
                    f"update from {msg.client_id}: tensor {k!r} has shape {list(p.shape)}, "
                    f"expected {list(expected[k].shape)}"
                )
        # Decoding is stateless: everything needed is in the (validated) packed tensor.
        delta = {k: dequantize(p).float() for k, p in msg.tensors.items()}
        for k, d in delta.items():
            if not bool(torch.isfinite(d).all()):
                raise FedqError(f"update from {msg.client_id}: tensor {k!r} decodes to NaN/Inf")
        with self._lock:
            if self._round is not rnd:
                raise FedqError(f"round {msg.round} closed before the update from {msg.client_id}")
            if msg.client_id in rnd.updates:
                raise FedqError(f"duplicate update from {msg.client_id} in round {msg.round}")
            rnd.updates[msg.client_id] = (delta, n)
            rnd.client_scalars[msg.client_id] = dict(msg.scalars)

    # -------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {
            "round_done": self.round_done,
            "global_state": {k: v.clone() for k, v in self.global_state.items()},
            "strategy": self.strategy.state_dict(),
            "downlink": self.downlink.state_dict(),
            "privacy": self.privacy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round_done = int(state["round_done"])
        self.global_state = {k: v.clone() for k, v in state["global_state"].items()}
        self.strategy.load_state_dict(state.get("strategy", {}))
        self.downlink.load_state_dict(state.get("downlink", {}))
        if "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
