"""The split step protocol and SplitFed, as plain classes (transport-agnostic).

One step (docs/design.md §3; docs/algorithms.md §1.2):

1. client: ``h = bottom(batch)`` (with activation DP: per-example clip + Gaussian noise,
   :mod:`fedq.split.privacy`); ``h_hat, packed = act_q.forward_encode(h)`` (the fake-quantized
   value *is* the decoded payload, :mod:`fedq.adapt.amaq`);
2. client -> server ``WireMessage.activations(tensors={"h", "mask", "labels"})``; labels
   travel with the activations (vanilla split learning, §4);
3. server ``step`` (the round engine's in-round ``exchange`` calls it): decode, ``loss = top(h)``,
   backward (+ its bit regularizer), quantize ``dL/dh`` with its gradient gates, step its
   optimizer (top LoRA + head + gates);
4. server -> client ``WireMessage.gradients(tensors={"g"})`` plus scalars (loss, bits);
5. client: ``h_hat.backward(g_hat)`` + its regularizer, step (bottom LoRA + activation gates).

With the AQ-SGD baseline (``split.act_codec: aqsgd``, :mod:`fedq.adapt.aqsgd`) step 1 codes the
change of each example's activation since its last visit, step 2 adds the example ids and the
versions coded against (``ids``, ``ref``), step 3 decodes against the server's copy of that
client's activations, and each side commits the new activations only once the step has gone
through; evaluation codes the activations directly.

In budget mode (default) each party's gates are stepped by a :class:`GateController` after the
LoRA optimizer: normalised SGD, then projection onto the scheduled mean bits.

SplitFed (Thapa et al. 2022; docs/algorithms.md §5.25): one shared server top updated by every
client's steps in turn (SFL-V2; the round engine runs the selected clients' turns in roster
order, each all its steps of the round, so runs are reproducible); each round a selected client
downloads the averaged client state (its task), runs ``local_steps`` steps, and uploads its client
state (raw fp32, counted like everything else); closing the round averages the states weighted by
samples (FedAvg, as SplitLoRA every R steps), all or nothing. The client state is the bottom LoRA
plus the client's AMAQ gates, so the gates are averaged too. A discarded round (too few client
states arrived) leaves the whole model as it was when the round opened: the server takes a
:class:`RoundSnapshot` of what its steps change (the top's LoRA, head and gates, its optimizer
and gate-controller state, the stochastic-rounding streams) when a round opens and puts it back
when the round is discarded or abandoned, so the steps taken in it leave no trace. Only the
AQ-SGD copies stay as the steps left them: they are the codec's, kept in step with the
client's, not the model's. The server keeps a copy of the bottom only to evaluate the whole model
with the averaged client state, quantization at the cut included (forward only).

The server records every step as it sees it (``bits.jsonl``): wire bytes both ways, bits and
payload sizes of both tensors, the loss, and the client's step time (the time between its
consecutive messages); the client adds what only it knows (inner boundaries' bits, the fraction of
examples clipped by activation DP) as scalars of its activations message.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedq.adapt import CutCodec, GateController, bit_stats
from fedq.codec import PackedTensor, dequantize, raw
from fedq.config import RunConfig
from fedq.data.datasets import Shard
from fedq.data.instruct import answer_rows, sample_prompts
from fedq.errors import FedqError
from fedq.models.rng import seeded_forward
from fedq.privacy import GaussianMechanism
from fedq.rounds import client_seed, weighted_mean
from fedq.rounds.node import Connection
from fedq.rounds.workload import Ledger, Member, Update
from fedq.split.codecs import (
    bit_schedule,
    cut_budget,
    gate_controller,
    lora_optimizer,
    make_codec,
    make_receiver,
    pack_labels,
    pack_mask,
    unpack_labels,
    unpack_mask,
)
from fedq.split.models import CLASSIFY, SplitModel
from fedq.split.privacy import enabled as dp_enabled
from fedq.split.privacy import make_ledger, privatize_activations
from fedq.wire.control import Assignment
from fedq.wire.message import MessageKind, WireMessage, message_nbytes

log = logging.getLogger(__name__)


#: Scalars of an activations message that carry the client's own step stats into bits.jsonl.
CLIENT_STATS = ("bits/b", "dp_clipped_frac")


def total_steps(cfg: RunConfig) -> int:
    return cfg.rounds.count * cfg.split.local_steps


def _stats_row(prefix: str, q: torch.nn.Module) -> dict[str, float]:
    s = bit_stats(q)
    return {} if s is None else {f"{prefix}/{k}": v for k, v in s.items()}


# ----------------------------------------------------------------------------------- server


class SplitServer:
    """Main server (shared top, gradient codec) and fed server (FedAvg of client states): the
    round engine's workload in split mode."""

    def __init__(self, cfg: RunConfig, model: SplitModel, test_data: Any, num_labels: int) -> None:
        self.cfg = cfg
        self.model = model
        self.test_data = test_data
        self.num_labels = num_labels
        sc = cfg.split
        self.ledger: Ledger = make_ledger(cfg)
        self.grad_q = make_codec(sc, "grad", model.hidden, seed=cfg.seed)
        self.eval_act_q = make_codec(sc, "act", model.hidden)  # evaluation codes the cut as sent
        self.act_rx = make_receiver(sc, "act")
        self.grad_q.to(model.device)
        self.eval_act_q.to(model.device)
        self.schedule = bit_schedule(sc, total_steps(cfg))
        self.gates = gate_controller(sc, _gate_groups(model.top, grad=[self.grad_q]), self.schedule)
        self.budget = cut_budget(cfg)  # the run's byte account (split.budget_bytes), or None
        lora = [p for n, p in model.top.named_parameters() if p.requires_grad and "gate" not in n]
        self.opt = lora_optimizer(lora, cfg.train)
        self.client_state = _client_state(model, self.eval_act_q)
        self._lock = threading.Lock()
        self._task: WireMessage | None = None
        self._rows: list[dict[str, Any]] = []
        self._seen: dict[str, float] = {}  # client -> time of its last message (step seconds)
        self._snapshot: RoundSnapshot | None = None  # the open round's start (rolled back to)
        self.steps = 0

    def info(self) -> dict[str, Any]:
        numel = sum(v.numel() for v in self.client_state.values())
        return {"trainable_params": numel, "task": self.model.task}

    # -- rounds ---------------------------------------------------------------------------------
    def open_round(self, r: int, selected: Sequence[Member]) -> None:
        tensors = {k: raw(v) for k, v in self.client_state.items()}
        with self._lock:
            self._snapshot = RoundSnapshot.take(self)
            self._task = WireMessage.global_model(
                "", r, tensors, scalars=self.ledger.client_scalars()
            )
            self._rows, self._seen = [], {}

    def task(self, r: int, member: Member) -> WireMessage:
        with self._lock:
            t = self._task
            self._seen[member.client_id] = time.monotonic()
        if t is None or t.round != r:
            raise FedqError(f"no split task prepared for round {r}")
        return t.addressed_to(member.client_id)

    def accept(self, r: int, member: Member, msg: WireMessage) -> Update:
        if set(msg.tensors) != set(self.client_state):
            raise FedqError(f"client state from {msg.client_id} does not match the model")
        state = {k: dequantize(p).float() for k, p in msg.tensors.items()}
        for k, v in state.items():
            if v.shape != self.client_state[k].shape or not bool(torch.isfinite(v).all()):
                raise FedqError(f"client state from {msg.client_id}: bad tensor {k!r}")
        n = msg.scalars.get("num_samples", 0.0)
        if not (math.isfinite(n) and n > 0):
            raise FedqError(f"client state from {msg.client_id}: num_samples must be > 0")
        with self._lock:
            seen = self._seen.get(member.client_id)
            if seen is not None and self._rows and self._rows[-1]["client"] == member.client_id:
                self._rows[-1]["seconds"] = time.monotonic() - seen  # the last step's time
        # Its weight in the average: never more than the examples it declared when it
        # registered (fixed for the run), whatever it claims now.
        weight = min(float(n), float(member.num_examples))
        return Update(member, state, weight, dict(msg.scalars), msg.nbytes)

    def close_round(self, r: int, updates: Sequence[Update], apply: bool) -> dict[str, Any]:
        """Average the client states (``apply``), or roll the server's half back to the round's
        start (module docstring); evaluate when due."""
        with self._lock:  # no step of round r runs after this: step() checks the task
            rows, self._rows, self._task = self._rows, [], None
            snapshot, self._snapshot = self._snapshot, None
            if not apply and snapshot is not None:
                snapshot.restore(self)
        if apply and updates:
            self.client_state = weighted_mean([(dict(u.tensors), u.weight) for u in updates])
        rec = round_record(self.cfg, r, rows, updates)
        rec.update(self.bit_summary())
        if self.budget is not None:  # the run's byte account so far (fedq.split.budget)
            rec["budget_spent"] = self.budget.spent
            level = self.budget.level
            rec["budget_level"] = None if math.isnan(level) else level
        if self.test_data is not None and (
            (r + 1) % self.cfg.rounds.eval_every == 0 or r + 1 == self.cfg.rounds.count
        ):
            rec.update(self.evaluate())
        rec["steps"] = rows
        return rec

    def abandon_round(self, r: int) -> None:
        """The run stopped while round ``r`` was open: roll its steps back (a resume runs it
        again from the checkpoint), so what the run reports at its end is the last round's."""
        with self._lock:
            self._rows, self._task = [], None
            snapshot, self._snapshot = self._snapshot, None
            if snapshot is not None:
                snapshot.restore(self)

    def bit_summary(self) -> dict[str, float]:
        """Integer bit maps now in force: ``bits/<boundary>/<dir>/{mean,min,max}``."""
        _load_client_state(self.model, self.eval_act_q, self.client_state)
        row = _stats_row("bits/cut/act", self.eval_act_q) | _stats_row("bits/cut/grad", self.grad_q)
        for i, b in enumerate(_boundaries(self.model)):
            row |= _stats_row(f"bits/b{i}/act", b.act_q) | _stats_row(f"bits/b{i}/grad", b.grad_q)
        return row

    def bit_maps(self) -> dict[str, list[int]]:
        """Per-channel integer bits of every AMAQ quantizer (the histogram in report.png)."""
        _load_client_state(self.model, self.eval_act_q, self.client_state)
        named = [("cut/act", self.eval_act_q), ("cut/grad", self.grad_q)]
        for i, b in enumerate(_boundaries(self.model)):
            named += [(f"b{i}/act", b.act_q), (f"b{i}/grad", b.grad_q)]
        out = {}
        for name, q in named:
            ib = q.int_bits()
            if ib is not None:
                out[name] = [int(x) for x in ib.tolist()]
        return out

    @torch.no_grad()
    def evaluate(self, batch_size: int = 64) -> dict[str, Any]:
        """Whole model with the averaged client state; activations quantized at the cut. A
        causal LM adds its greedy answers to the sample prompts (``samples``, written to
        ``generations.jsonl`` as in federated mode), generated by the whole model with those
        adapters and without quantization at the cut (generation runs in one process)."""
        m = self.model
        _load_client_state(m, self.eval_act_q, self.client_state)
        was = m.full.training
        m.full.eval()
        data = self.test_data
        loss_sum, correct, count = 0.0, 0, 0
        for s in range(0, len(data), batch_size):
            idx = list(range(s, min(s + batch_size, len(data))))
            batch = m.batch(data, idx)
            h = self.eval_act_q(m.bottom(batch))
            loss, c, n = m.top(h, batch["attention_mask"], batch["labels"])
            loss_sum += float(loss) * n
            correct, count = correct + c, count + n
        m.full.train(was)
        loss = loss_sum / max(count, 1)
        out: dict[str, Any] = {"accuracy": correct / max(count, 1), "loss": loss}
        if m.task != CLASSIFY:
            out["perplexity"] = math.exp(min(loss, 50.0))
            prompts = sample_prompts(self.cfg.model.sample_prompts, data)
            if prompts:
                from fedq.models.hf import generate

                answers = generate(
                    m.full, m.tokenizer, prompts, self.cfg.model.sample_tokens, m.device
                )
                out["samples"] = answer_rows(prompts, answers)
        return out

    # -- steps ----------------------------------------------------------------------------------
    def _decode_step(self, msg: WireMessage) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Validate an activations message and decode it: ``(received, mask, labels)``."""
        names = self.act_rx.wire_names | {"mask", "labels"}
        if msg.kind != MessageKind.ACTIVATIONS or set(msg.tensors) != names:
            raise FedqError(
                f"expected activations {'/'.join(sorted(names))}, got {str(msg.kind)!r} "
                f"{sorted(msg.tensors)}"
            )
        ph = msg.tensors["h"]
        m = self.model
        if len(ph.shape) != 3 or ph.shape[2] != m.hidden or not 1 <= ph.shape[1] <= m.max_length:
            raise FedqError(
                f"activations must be [B, T<={m.max_length}, {m.hidden}], got {list(ph.shape)}"
            )
        b, t = ph.shape[0], ph.shape[1]
        mask = unpack_mask(msg.tensors["mask"]).to(m.device)
        labels = unpack_labels(msg.tensors["labels"], 0, self.num_labels).to(m.device)
        want = (b,) if m.task == CLASSIFY else (b, t)
        if tuple(mask.shape) != (b, t) or tuple(labels.shape) != want:
            raise FedqError(f"mask {list(mask.shape)} / labels {list(labels.shape)} do not fit h")
        with self._lock:  # a stateful receiver's per-peer state is shared by the streams
            received = self.act_rx.receive(msg.tensors, msg.client_id, m.device)
        return received, mask, labels

    def exchange(self, r: int, member: Member, msg: WireMessage) -> WireMessage:
        """The round engine's in-round exchange: one step, in the turn order split mode asks
        for (:meth:`fedq.modes.split.SplitMode.round_policy`)."""
        return self.step(r, member, msg)

    def step(self, r: int, member: Member, msg: WireMessage) -> WireMessage:
        """One server step (module docstring, 3-4), recorded as a row of ``bits.jsonl``."""
        received, mask, labels = self._decode_step(msg)
        with self._lock:
            if self._task is None or self._task.round != r:
                raise FedqError(f"round {r} is closed: step {msg.step} comes too late")
            h = received.value
            h.requires_grad_(True)
            try:
                with seeded_forward(self.cfg.seed, "server:" + msg.client_id, msg.step, h.device):
                    loss, correct, count = self.model.top(h, mask, labels)
                loss.backward()
                assert h.grad is not None
                coded = self.grad_q.send(h.grad)
                self.opt.step()
                reply, bytes_down, target = self._reply(msg, coded, loss, correct, count)
                if self.gates is not None:
                    self.gates.step(msg.step, target)
            finally:  # a step that failed half-way leaves no gradient for the next one
                self.opt.zero_grad(set_to_none=True)
                _clear_grads(self.model.top, self.grad_q)
            self.act_rx.settle(msg.client_id, received, ok=True)
            self.steps += 1
        pg, ph = coded.tensors["g"], msg.tensors["h"]
        now = time.monotonic()
        row: dict[str, Any] = {
            "round": r,
            "client": member.client_id,
            "step": msg.step,
            "count": count,
            "loss": reply.scalars["loss"],
            "bytes_up": msg.nbytes,
            "bytes_down": bytes_down,
            "numel": ph.numel,
            "act_bits": ph.mean_bits(),
            "grad_bits": pg.mean_bits(),
            "act_payload": ph.payload_nbytes,
            "act_meta": ph.metadata_nbytes,
            "grad_payload": pg.payload_nbytes,
            "grad_meta": pg.metadata_nbytes,
        }
        if self.cfg.split.act_codec == "amaq":
            b = ph.bits.float()
            row |= {
                "bits/cut/act/mean": float(b.mean()),
                "bits/cut/act/min": float(b.min()),
                "bits/cut/act/max": float(b.max()),
            }
        row |= _stats_row("bits/cut/grad", self.grad_q)
        row |= {k: v for k, v in msg.scalars.items() if k.startswith(CLIENT_STATS)}
        with self._lock:
            seen = self._seen.get(member.client_id)
            row["seconds"] = now - seen if seen is not None else None
            self._seen[member.client_id] = now
            self._rows.append(row)
        return reply

    def _reply(
        self, msg: WireMessage, coded: Any, loss: torch.Tensor, correct: int, count: int
    ) -> tuple[WireMessage, int, float | None]:
        """The gradients message of a step, its bytes as framed, and (under a byte budget) the
        bits planned for the next step, which the message carries to the client as
        ``act_target_bits`` once this step's bytes both ways are in the account."""
        pg = coded.tensors["g"]
        scalars = {
            "loss": float(loss.detach()),
            "correct": float(correct),
            "count": float(count),
            "grad_rel_err": coded.stats["rel_err"],
            "grad_bits": pg.mean_bits(),
        }
        for k, v in _stats_row("grad", self.grad_q).items():
            scalars[k.replace("/", "_")] = v
        # a non-zero stand-in of the same size (a double): the real target needs this message's
        # bytes in the account first (the budget test checks the account equals the transport's)
        if self.budget is not None:
            scalars["act_target_bits"] = float(self.budget.b_max)
        reply = WireMessage.gradients(
            msg.client_id, msg.round, msg.step, coded.tensors, scalars=scalars
        )
        nbytes = message_nbytes(reply, self.cfg.runtime.chunk_bytes)
        if self.budget is None:
            return reply, nbytes, None
        ph = msg.tensors["h"]
        self.budget.record(msg.nbytes + nbytes, ph.payload_nbytes + pg.payload_nbytes, ph.numel)
        target = self.budget.target()
        scalars["act_target_bits"] = target
        reply = WireMessage.gradients(
            msg.client_id, msg.round, msg.step, coded.tensors, scalars=scalars
        )
        return reply, nbytes, target

    # -- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        top = {
            n: p.detach().clone() for n, p in self.model.top.named_parameters() if p.requires_grad
        }
        return {
            "top": top,
            "optimizer": self.opt.state_dict(),
            "grad_q": self.grad_q.state_dict(),
            "gates": None if self.gates is None else self.gates.state_dict(),
            "act_rx": self.act_rx.state_dict(),
            "client_state": {k: v.clone() for k, v in self.client_state.items()},
            "steps": self.steps,
            "ledger": self.ledger.state_dict(),
            "budget": None if self.budget is None else self.budget.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        params = dict(self.model.top.named_parameters())
        with torch.no_grad():
            for n, v in state["top"].items():
                params[n].copy_(v)
        self.opt.load_state_dict(state["optimizer"])
        self.grad_q.load_state_dict(state["grad_q"])
        if self.gates is not None and state.get("gates") is not None:
            self.gates.load_state_dict(state["gates"])
        self.act_rx.load_state_dict(state["act_rx"])
        self.client_state = {k: v.clone() for k, v in state["client_state"].items()}
        self.steps = int(state["steps"])
        self.ledger.load_state_dict(state["ledger"])
        if self.budget is not None and state.get("budget") is not None:
            self.budget.load_state_dict(state["budget"])


class RoundSnapshot:
    """What a server step changes, as it was when a round opened (module docstring): the top's
    trainable tensors (LoRA, head, gates of inner boundaries), the gradient codec (its gates and
    stochastic-rounding stream), the other codecs' streams in the top, the optimizer and gate
    controller state and the step count. Never the frozen base: steps do not touch it."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    @classmethod
    def take(cls, server: SplitServer) -> RoundSnapshot:
        top = server.model.top
        return cls(
            copy.deepcopy(
                {
                    "top": {n: p.detach() for n, p in top.named_parameters() if p.requires_grad},
                    "codecs": [q.get_extra_state() for q in _codecs(top)],
                    "grad_q": server.grad_q.state_dict(),
                    "optimizer": server.opt.state_dict(),
                    "gates": None if server.gates is None else server.gates.state_dict(),
                    "steps": server.steps,
                }
            )
        )

    def restore(self, server: SplitServer) -> None:
        s = self.state
        params = dict(server.model.top.named_parameters())
        with torch.no_grad():
            for n, v in s["top"].items():
                params[n].copy_(v)
        for q, extra in zip(_codecs(server.model.top), s["codecs"], strict=True):
            q.set_extra_state(extra)
        server.grad_q.load_state_dict(s["grad_q"])
        server.opt.load_state_dict(s["optimizer"])
        if server.gates is not None and s["gates"] is not None:
            server.gates.load_state_dict(s["gates"])
        server.opt.zero_grad(set_to_none=True)
        _clear_grads(server.model.top, server.grad_q)
        server.steps = int(s["steps"])


def _codecs(part: torch.nn.Module) -> list[CutCodec]:
    return [m for m in part.modules() if isinstance(m, CutCodec)]


def _clear_grads(*parts: torch.nn.Module) -> None:
    for part in parts:
        for p in part.parameters():
            p.grad = None


def round_record(
    cfg: RunConfig, r: int, rows: Sequence[Mapping[str, Any]], updates: Sequence[Update]
) -> dict[str, Any]:
    """One metrics.jsonl record from the round's step rows and its client-state uploads."""
    numel = sum(s["numel"] for s in rows)
    rec: dict[str, Any] = {"step": (r + 1) * cfg.split.local_steps}
    state_numel = sum(sum(int(t.numel()) for t in u.tensors.values()) for u in updates)
    rec["bytes_fp32"] = 2 * 4 * numel + 2 * 4 * state_numel
    bits = sum((s["act_bits"] + s["grad_bits"]) * s["numel"] for s in rows)
    rec["mean_bits"] = bits / (2 * numel) if numel else None
    rec["act_bits"] = sum(s["act_bits"] * s["numel"] for s in rows) / numel if numel else None
    rec["grad_bits"] = sum(s["grad_bits"] * s["numel"] for s in rows) / numel if numel else None
    # everything the activation / gradient tensors put on the wire (codes, scales, offsets, bit
    # maps, row scales, float16 outlier rows), in bits per value: what mean_bits does not show
    for d in ("act", "grad"):
        nbytes = sum(s[f"{d}_payload"] + s[f"{d}_meta"] for s in rows)
        rec[f"{d}_wire_bits"] = 8 * nbytes / numel if numel else None
    rec["step_bytes_up"] = sum(s["bytes_up"] for s in rows) / max(len(rows), 1)
    rec["step_bytes_down"] = sum(s["bytes_down"] for s in rows) / max(len(rows), 1)
    rec["state_bytes"] = sum(u.nbytes for u in updates)
    n = sum(s["count"] for s in rows)
    rec["train_loss"] = sum(s["loss"] * s["count"] for s in rows) / n if n else None
    clipped = [s["dp_clipped_frac"] for s in rows if "dp_clipped_frac" in s]
    if clipped:
        rec["dp_clipped_frac"] = sum(clipped) / len(clipped)
    return rec


# ----------------------------------------------------------------------------------- client


def _boundaries(model: SplitModel) -> list[Any]:  # SimulatedBoundary
    return [*model.bottom.boundaries, *model.top.boundaries]


def _gate_groups(
    part: torch.nn.Module, act: list[CutCodec] | None = None, grad: list[CutCodec] | None = None
) -> list[list[CutCodec]]:
    """One budget group per direction: the party's cut quantizer plus its inner boundaries'."""
    bounds: Any = getattr(part, "boundaries", [])
    return [
        [*(act or []), *(b.act_q for b in bounds)],
        [*(grad or []), *(b.grad_q for b in bounds)],
    ]


def _client_state(model: SplitModel, act_q: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.bottom_state()
    state.update({f"act_q.{n}": p.detach().clone() for n, p in act_q.named_parameters()})
    return state


def _load_client_state(
    model: SplitModel, act_q: torch.nn.Module, state: dict[str, torch.Tensor]
) -> None:
    model.load_bottom_state({k: v for k, v in state.items() if not k.startswith("act_q.")})
    with torch.no_grad():
        for n, p in act_q.named_parameters():
            p.copy_(state[f"act_q.{n}"])


#: XOR-ed into the client seed for the activation-DP noise stream (independent of batch order).
_NOISE_STREAM = 0x5EED_D0_0D


class SplitClientWorker:
    """Runs the split rounds of the logical clients in ``shards`` (one model, whose client state
    is loaded from the server at the start of each client's round): a
    :class:`~fedq.rounds.node.TaskRunner`. ``index`` maps client id to roster index (seeds).

    A client keeps nothing between rounds but its activation codec's state (the AQ-SGD copies),
    so running a round again starts from the same place; after a server restart the AQ-SGD
    copies re-synchronise through their versions (docs/algorithms.md §5.24)."""

    def __init__(
        self,
        cfg: RunConfig,
        model: SplitModel,
        shards: Mapping[str, Shard],
        index: Mapping[str, int],
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.shards = dict(shards)
        self.index = dict(index)
        sc = cfg.split
        self.act_q = make_codec(sc, "act", model.hidden)
        self.act_q.to(model.device)
        self.grad_rx = make_receiver(sc, "grad")
        self.schedule = bit_schedule(sc, total_steps(cfg))

    def round_closed(self, r: int) -> None:
        return None

    def run(self, task: Assignment, conn: Connection) -> dict[str, Any]:
        cid, r = task.client_id, task.round
        if cid not in self.shards:
            raise FedqError(f"{cid} is not hosted here")
        msg = conn.get_task(r, cid)
        _load_client_state(
            self.model, self.act_q, {k: dequantize(p) for k, p in msg.tensors.items()}
        )
        dp = None
        if dp_enabled(self.cfg):  # activation DP (fedq.split.privacy): z planned by the server
            dp = GaussianMechanism(msg.scalars["dp_clip"], msg.scalars["dp_noise_multiplier"])
        lora = [
            p
            for n, p in self.model.bottom.named_parameters()
            if p.requires_grad and "gate" not in n
        ]
        gates = gate_controller(
            self.cfg.split, _gate_groups(self.model.bottom, act=[self.act_q]), self.schedule
        )
        opt = lora_optimizer(lora, self.cfg.train)
        shard = self.shards[cid]
        seed = client_seed(self.cfg.seed, self.index[cid], r)
        gen = torch.Generator().manual_seed(seed)
        bs = self.cfg.train.batch_size
        order = shard.idx[torch.randperm(shard.size, generator=gen)]
        noise = torch.Generator().manual_seed(seed ^ _NOISE_STREAM)
        losses = []
        for s in range(self.cfg.split.local_steps):
            take = order[(torch.arange(bs) + s * bs) % max(order.numel(), 1)]
            step = r * self.cfg.split.local_steps + s
            losses.append(self.step(conn, cid, shard, opt, take, r, step, gates, dp, noise))
        state = _client_state(self.model, self.act_q)
        n = float(shard.size or 1)
        conn.push_update(
            WireMessage.update(
                cid, r, {k: raw(v) for k, v in state.items()}, scalars={"num_samples": n}
            )
        )
        return {"loss": sum(losses) / max(len(losses), 1), "steps": len(losses)}

    def step(
        self,
        conn: Connection,
        cid: str,
        shard: Shard,
        opt: torch.optim.Optimizer,
        take: torch.Tensor,
        r: int,
        step: int,
        gates: GateController | None,
        dp: GaussianMechanism | None,
        noise: torch.Generator,
    ) -> float:
        """One split step (module docstring, 1, 2 and 5); returns the server's loss."""
        m = self.model
        data: Any = shard.data  # text data (the split models are language models)
        batch = m.batch(data, take)
        with seeded_forward(self.cfg.seed, cid, step, m.device):
            h = m.bottom(batch)
        stats: dict[str, float] = {}
        if dp is not None:  # clip + noise before quantization (fedq.split.privacy)
            h, clipped = privatize_activations(h, dp, noise)
            stats["dp_clipped_frac"] = clipped / max(int(h.shape[0]), 1)
        bounds: Any = m.bottom.boundaries
        for i, b in enumerate(bounds):
            stats |= _stats_row(f"bits/b{i}/act", b.act_q) | _stats_row(f"bits/b{i}/grad", b.grad_q)
        coded = self.act_q.send(h, ids=take.tolist())
        tensors = {
            **coded.tensors,
            "mask": pack_mask(batch["attention_mask"]),
            "labels": pack_labels(batch["labels"]),
        }
        msg = WireMessage.activations(cid, r, step, tensors, scalars=stats)
        try:
            reply = conn.split_step(msg)
            if reply.kind != MessageKind.GRADIENTS or set(reply.tensors) != self.grad_rx.wire_names:
                raise FedqError(f"expected a gradients reply, got {str(reply.kind)!r}")
            pg = reply.tensors["g"]
            target = reply.scalars.get("act_target_bits")  # under a byte budget (the server's)
            if target is not None and not math.isfinite(target):
                raise FedqError(f"act_target_bits from the server must be finite, got {target}")
            if tuple(pg.shape) != tuple(h.shape):
                raise FedqError(f"gradient shape {list(pg.shape)} != activations {list(h.shape)}")
            received = self.grad_rx.receive(reply.tensors, "server", coded.value.device)
        except Exception:
            self.act_q.settle(coded, ok=False)
            raise
        self.act_q.settle(coded, ok=True)  # the server took the step
        self.grad_rx.settle("server", received, ok=True)
        coded.value.backward(received.value.to(coded.value.dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gates is not None:  # under a byte budget the server plans the next step's bits
            gates.step(step, target)
        return float(reply.scalars.get("loss", float("nan")))

    def state_dict(self) -> dict[str, Any]:
        return {"act_q": self.act_q.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "act_q" in state:
            self.act_q.load_state_dict(state["act_q"])


def packed_nbytes(p: PackedTensor) -> int:
    """Payload + declared metadata of one packed tensor."""
    return p.payload_nbytes + p.metadata_nbytes
