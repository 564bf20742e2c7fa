"""The federated half of the server: the round engine's workload (:mod:`fedq.rounds.engine`).

A round's task is the global trainable state, encoded once by the downlink codec for all the
selected clients; an update is a client's delta, validated and decoded as it arrives; closing a
round aggregates the updates (strategy, central DP) all or nothing (docs/algorithms.md §5.34)
and evaluates when due. A malformed update is rejected with a :class:`~fedq.errors.FedqError`
(a gRPC status for the sender) and never touches the model; so is one beyond the bounds of
``defence`` (non-finite, too large per tensor or in L2 norm). The round's updates are combined by
the run's aggregator (:mod:`fedq.fed.robust`) in roster order, and the new model is checked by the
same magnitude rule before it replaces the old one: a round that would leave a non-finite or
runaway model, or one the downlink codec cannot carry to the clients, is not applied
(docs/algorithms.md, "Defences").
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedq.adapt import BitContext
from fedq.codec import PackedTensor, dequantize
from fedq.config import RunConfig
from fedq.data.instruct import answer_rows, sample_prompts
from fedq.errors import CodecError, FedqError
from fedq.fed.pipeline import EncodeStats, LinkCodec
from fedq.fed.privacy import ServerPrivacy, make_privacy
from fedq.fed.robust import aggregate, clip_updates, update_norm
from fedq.fed.strategy import State, make_strategy
from fedq.fed.train import evaluation
from fedq.rounds import client_name
from fedq.rounds.workload import Member, Update
from fedq.wire.message import WireMessage

__all__ = ["FedServer", "abs_bounds", "client_name", "to_cpu"]

log = logging.getLogger(__name__)


def abs_bounds(state: Mapping[str, torch.Tensor], ratio: float | None) -> dict[str, float]:
    """Per tensor, the largest change of one entry a round may bring: ``ratio * (max|w| + 1)``
    (``defence.max_abs_ratio``; infinite when it is not set)."""
    if ratio is None:
        return {k: math.inf for k in state}
    return {
        k: ratio * (float(v.detach().abs().max()) + 1.0) if v.numel() else ratio
        for k, v in state.items()
    }


def site_metrics(updates: Sequence[Update], task: str) -> dict[str, Any]:
    """What the sites measured on their own held-out rows (``data.site_holdout``), from their
    updates' scalars, in roster order: ``site_eval`` (client id -> its ``loss``, ``count`` and
    ``accuracy`` or ``perplexity``) and the pooled ``site_loss`` with ``site_accuracy`` or
    ``site_perplexity`` (every row, or answer token, weighing the same). Empty when no update
    carries them; a report with a count that is not a positive whole number is left out."""
    rows: dict[str, dict[str, float]] = {}
    loss_sum = correct = count = 0.0
    for u in sorted(updates, key=lambda u: u.member.index):
        sc = u.scalars
        n, loss = sc.get("site_count", 0.0), sc.get("site_loss")
        if loss is None or not (n >= 1 and n == int(n)):
            continue
        row = {"loss": loss, "count": int(n)}
        if task == "causal_lm":
            row["perplexity"] = math.exp(min(loss, 50.0))
        else:
            right = min(max(sc.get("site_correct", 0.0), 0.0), n)
            row["accuracy"] = right / n
            correct += right
        rows[u.member.client_id] = row
        loss_sum += loss * n
        count += n
    if not rows:
        return {}
    pooled = loss_sum / count
    out: dict[str, Any] = {"site_eval": rows, "site_loss": pooled}
    if task == "causal_lm":
        out["site_perplexity"] = math.exp(min(pooled, 50.0))
    else:
        out["site_accuracy"] = correct / count
    return out


def to_cpu(tree: Any) -> Any:
    """``tree`` (dicts, lists, tuples of tensors and plain values) with every tensor on the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


class FedServer:
    """Holds the global trainable state, the strategy, the downlink codec and the privacy ledger."""

    def __init__(self, cfg: RunConfig, bundle: Any, test_data: Any | None) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.test_data = test_data
        self.strategy = make_strategy(cfg.fed)
        self.downlink = LinkCodec(cfg.compression.downlink, seed=cfg.seed)
        self.privacy = make_privacy(cfg)
        self.global_state: State = {
            k: v.detach().clone() for k, v in bundle.trainable_state().items()
        }
        self.round_done = -1
        self._lock = threading.Lock()
        self._task: WireMessage | None = None
        self._downlink_bits = 0.0
        self._bounds: dict[str, float] = {}  # of the open round's global model (open_round)
        # The next round's downlink, encoded when the model was checked (_downlink_problem).
        self._encoded: tuple[int, dict[str, PackedTensor], EncodeStats, LinkCodec] | None = None

    @property
    def ledger(self) -> ServerPrivacy:
        return self.privacy

    def info(self) -> dict[str, Any]:
        return {
            "trainable_params": sum(v.numel() for v in self.global_state.values()),
            "tensors": len(self.global_state),
        }

    # -------------------------------------------------------------- round lifecycle

    def open_round(self, r: int, selected: Sequence[Member]) -> None:
        """Encode the downlink once (every selected client gets the same bytes)."""
        rounds = self.cfg.rounds
        encoded, self._encoded = self._encoded, None
        if encoded is not None and encoded[0] == r:  # encoded by the check of the new model
            _, packed, stats, self.downlink = encoded
        else:
            packed, stats = self.downlink.encode(self.global_state, BitContext(r, rounds.count))
        scalars = {
            "total_rounds": float(rounds.count),
            "max_samples": float(max(self._declared(m) for m in selected)),
        }
        scalars.update(self.strategy.client_scalars())
        scalars.update(self.privacy.client_scalars())
        tags = {
            "strategy": self.strategy.name,
            "dp_mechanism": self.cfg.privacy.mechanism,
            "laplace_calibration": self.cfg.privacy.laplace_calibration,
        }
        bounds = abs_bounds(self.global_state, self.cfg.defence.max_abs_ratio)
        with self._lock:
            self._task = WireMessage.global_model("", r, packed, scalars=scalars, tags=tags)
            self._downlink_bits = stats.mean_bits
            self._bounds = bounds

    def task(self, r: int, member: Member) -> WireMessage:
        with self._lock:
            t = self._task
        if t is None or t.round != r:
            raise FedqError(f"no task prepared for round {r}")
        return t.addressed_to(member.client_id)

    def accept(self, r: int, member: Member, msg: WireMessage) -> Update:
        """Validate and decode one client's delta; raises FedqError (nothing kept) if bad."""
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
        # Decoding is stateless: everything needed is in the (validated) packed tensor. It
        # decodes onto the model's device (the GPU kernels there, runtime.device).
        dev = self.bundle.device
        delta = {k: dequantize(p, device=dev).float() for k, p in msg.tensors.items()}
        problem = self._out_of_bounds(delta)
        if problem:
            raise FedqError(f"update from {msg.client_id}: {problem}")
        return Update(member, delta, self._weight(member, float(n)), dict(msg.scalars), msg.nbytes)

    def _out_of_bounds(self, delta: Mapping[str, torch.Tensor]) -> str | None:
        """Why ``delta`` is refused (defence bounds), or None."""
        ratio = self.cfg.defence.max_abs_ratio
        with self._lock:
            bounds = self._bounds or abs_bounds(self.global_state, ratio)
        for k, d in delta.items():
            if not bool(torch.isfinite(d).all()):
                return f"tensor {k!r} decodes to NaN/Inf"
            big = float(d.abs().max()) if d.numel() else 0.0
            if big > bounds[k]:
                return (
                    f"tensor {k!r} changes an entry by {big:.4g}, beyond the bound "
                    f"{bounds[k]:.4g} (defence.max_abs_ratio={ratio:g} x (max|w| + 1))"
                )
        limit = self.cfg.defence.max_update_norm
        if limit is not None:
            norm = update_norm(delta)
            if norm > limit:
                return f"L2 norm {norm:.4g} exceeds defence.max_update_norm={limit:g}"
        return None

    def _declared(self, member: Member) -> int:
        """The examples ``member`` registered, within ``defence.max_examples_per_client``."""
        cap = self.cfg.defence.max_examples_per_client
        return member.num_examples if cap is None else min(member.num_examples, cap)

    def _weight(self, member: Member, n: float) -> float:
        """The update's weight in the mean: 1 (``defence.weights: equal``) or its examples,
        never more than the client declared when it registered nor the run's cap."""
        d = self.cfg.defence
        if d.weights == "equal":
            return 1.0
        return min(n, float(self._declared(member)))

    def close_round(self, r: int, updates: Sequence[Update], apply: bool) -> dict[str, Any]:
        """Aggregate (all or nothing) and evaluate when due."""
        rejected = self._apply(r, updates) if apply else None
        out: dict[str, Any] = {"bits_down": self._downlink_bits, "rejected": rejected}
        with_loss = [u for u in updates if "loss" in u.scalars]
        if with_loss:
            n = sum(u.weight for u in with_loss)
            out["train_loss"] = sum(u.scalars["loss"] * u.weight for u in with_loss) / n
        sizes = [sum(int(t.numel()) for t in u.tensors.values()) for u in updates]
        numel = sum(sizes)
        bits = sum(u.scalars.get("mean_bits", 0.0) * n for u, n in zip(updates, sizes, strict=True))
        out["mean_bits"] = bits / numel if numel else None
        out["fp32_up"] = int(sum(u.scalars.get("fp32_bytes", 0.0) for u in updates))
        reported = {
            u.member.client_id: u.scalars["dp_epsilon"]
            for u in updates
            if "dp_epsilon" in u.scalars
        }
        if reported:  # DP-SGD: each client's own accounting, checked against the ledger
            out["epsilon_reported"] = max(reported.values())
            out["epsilon_disagrees"] = self.privacy.disagreements(
                {
                    u.member.index: u.scalars["dp_epsilon"]
                    for u in updates
                    if "dp_epsilon" in u.scalars
                }
            )
        out.update(site_metrics(updates, self.bundle.task))
        last = r + 1 == self.cfg.rounds.count
        if self.test_data is not None and ((r + 1) % self.cfg.rounds.eval_every == 0 or last):
            out.update(self.evaluate())
        with self._lock:
            self._task = None
        return out

    def _apply(self, r: int, updates: Sequence[Update]) -> str | None:
        """Combine the updates (roster order) and apply the result all or nothing; returns why
        the new model was refused, or None once it is the global model."""
        d = self.cfg.defence
        self._encoded = None
        pairs = clip_updates([(u.tensors, u.weight) for u in updates], d.clip_norm)
        noise_gen = torch.Generator().manual_seed(self.cfg.seed * 7_368_787 + r)
        mean = self.privacy.aggregate(pairs, noise_gen, lambda p: aggregate(d, p))
        before = self.strategy.state_dict()  # FedAdam's moments change as it steps
        new = self.strategy.apply(self.global_state, mean)
        problem = self._model_problem(new) or self._downlink_problem(r, new)
        if problem is not None:
            self.strategy.load_state_dict(before)
            log.warning("round %d not applied: %s", r, problem)
            return problem
        self.global_state = new  # one assignment
        self.round_done = r
        return None

    def _model_problem(self, new: Mapping[str, torch.Tensor]) -> str | None:
        """Why ``new`` may not replace the global model (non-finite, or an entry moved beyond
        the magnitude bound), or None."""
        bounds = abs_bounds(self.global_state, self.cfg.defence.max_abs_ratio)
        for k, v in new.items():
            if not bool(torch.isfinite(v).all()):
                return f"the new model's tensor {k!r} holds NaN/Inf"
            moved = (
                float((v.float() - self.global_state[k].float()).abs().max()) if v.numel() else 0.0
            )
            if moved > bounds[k]:
                return (
                    f"the new model's tensor {k!r} moves an entry by {moved:.4g}, beyond the "
                    f"bound {bounds[k]:.4g}"
                )
        for part, tensors in self.strategy.state_dict().items():  # FedAdam's moments
            for k, v in tensors.items() if isinstance(tensors, dict) else ():
                if isinstance(v, torch.Tensor) and not bool(torch.isfinite(v).all()):
                    return f"the server optimizer's state {part}[{k!r}] holds NaN/Inf"
        return None

    def _downlink_problem(self, r: int, new: Mapping[str, torch.Tensor]) -> str | None:
        """Why the clients could not decode ``new`` as the next round's task, or None: a finite
        model can still be beyond what the downlink codec carries (a float16 scale overflows once
        a tensor's range passes about 65504 x (2^bits - 1)), and then every download of every
        later round would fail. Encoded as round ``r + 1`` will encode it, by a copy of the
        downlink codec; when the model is applied, that round's :meth:`open_round` takes this
        encoding and the copy's state (the same bytes, encoded once)."""
        trial = LinkCodec(self.cfg.compression.downlink, seed=self.cfg.seed)
        trial.load_state_dict(self.downlink.state_dict())
        try:
            packed, stats = trial.encode(new, BitContext(r + 1, self.cfg.rounds.count))
            dev = self.bundle.device
            bad = [
                k
                for k, p in packed.items()
                if not bool(torch.isfinite(dequantize(p, device=dev)).all())
            ]
        except CodecError as e:
            return f"the new model is beyond what the downlink codec carries: {e}"
        if bad:
            return (
                f"the new model's tensor {bad[0]!r} is beyond what the downlink codec carries "
                "(it would decode to NaN/Inf)"
            )
        self._encoded = (r + 1, packed, stats, trial)
        return None

    def evaluate(self) -> dict[str, Any]:
        """The global model on the evaluation data; a causal LM adds its greedy answers to the
        sample prompts (``samples``, which the recorder writes to ``generations.jsonl``)."""
        self.bundle.load_trainable_state(self.global_state)
        out = evaluation(self.bundle, self.test_data)
        if self.bundle.task == "causal_lm":
            prompts = sample_prompts(self.cfg.model.sample_prompts, self.test_data)
            answers = self.bundle.generate(prompts, self.cfg.model.sample_tokens)
            out["samples"] = answer_rows(prompts, answers)
        return out

    # -------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """On the CPU whatever the device, so a checkpoint resumes on any machine."""
        return to_cpu(
            {
                "round_done": self.round_done,
                "global_state": {k: v.clone() for k, v in self.global_state.items()},
                "strategy": self.strategy.state_dict(),
                "downlink": self.downlink.state_dict(),
                "privacy": self.privacy.state_dict(),
                # what rebuilds the model from this state alone (fedq export)
                "model_shape": {
                    "num_classes": int(self.bundle.num_classes),
                    "input_dim": int(self.bundle.input_dim or 0),
                },
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round_done = int(state["round_done"])
        self._encoded = None
        dev = self.bundle.device
        self.global_state = {k: v.to(dev, copy=True) for k, v in state["global_state"].items()}
        self.strategy.load_state_dict(state.get("strategy", {}))
        self.downlink.load_state_dict(state.get("downlink", {}))
        if "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
