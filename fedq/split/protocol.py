"""The split step protocol and SplitFed, as plain classes (transport-agnostic).

One step (docs/design.md §3; docs/algorithms.md §1.2):

1. client: ``h = bottom(batch)`` (with activation DP: per-example clip + Gaussian noise,
   :mod:`fedq.split.privacy`); ``h_hat, packed = act_q.forward_encode(h)`` (the fake-quantized
   value *is* the decoded payload, :mod:`fedq.adapt.amaq`);
2. client -> server ``WireMessage(kind="activations", tensors={"h", "mask", "labels"})``; labels
   travel with the activations (vanilla split learning, §4);
3. server ``split_step``: decode, ``loss = top(h)``, backward (+ its bit regularizer), quantize
   ``dL/dh`` with its gradient gates, step its optimizer (top LoRA + head + gates);
4. server -> client ``WireMessage(kind="gradients", tensors={"g"})`` plus scalars (loss, bits);
5. client: ``h_hat.backward(g_hat)`` + its regularizer, step (bottom LoRA + activation gates).

With the AQ-SGD baseline (``split.act_codec: aqsgd``, :mod:`fedq.adapt.aqsgd`) step 1 codes the
change of each example's activation since its last visit, step 2 adds the example ids and the
versions coded against (``ids``, ``ref``), step 3 decodes against the server's copy of that
client's activations, and each side commits the new activations only once the step has gone
through; evaluation codes the activations directly.

In budget mode (default) each party's gates are stepped by a :class:`GateController` after the
LoRA optimizer: normalised SGD, then projection onto the scheduled mean bits.

SplitFed (Thapa et al. 2022; §4) [I]: one shared server top updated by every client's steps in
turn (SFL-V2, a lock serialises them); each round a client downloads the averaged client state
(``get_task``), runs ``local_steps`` steps, and uploads its client state (``push_update``, raw
fp32, counted like everything else); the server averages the states weighted by samples (FedAvg,
as SplitLoRA every R steps). The client state is the bottom LoRA plus the client's AMAQ gates,
so the gates are averaged too. The server keeps a copy of the bottom only to evaluate the whole
model with the averaged client state, quantization at the cut included (forward only).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedq.adapt import CutCodec, GateController, bit_stats
from fedq.codec import PackedTensor, dequantize, raw
from fedq.config import RunConfig
from fedq.errors import FedqError
from fedq.privacy import GaussianMechanism
from fedq.split.codecs import (
    bit_schedule,
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
from fedq.split.privacy import planned_noise_multiplier, privatize_activations
from fedq.wire.message import WireMessage

log = logging.getLogger(__name__)


class SplitConnection(Protocol):
    bytes_sent: int
    bytes_received: int

    def get_task(self, round: int) -> WireMessage: ...

    def push_update(self, msg: WireMessage) -> int: ...

    def split_step(self, msg: WireMessage) -> WireMessage: ...


def client_name(cid: int) -> str:
    return f"client-{cid}"


def total_steps(cfg: RunConfig) -> int:
    return cfg.fed.rounds * cfg.split.local_steps


@contextlib.contextmanager
def seeded_dropout(seed: int, who: str, step: int, device: torch.device) -> Iterator[None]:
    """Draw a forward's dropout masks from a generator seeded by (run seed, party, step), and
    leave the process's global RNG as it was: a step's masks then do not depend on what else ran
    before it in the process, so runs are reproducible, resumable and the same in every backend
    (the backward reuses the saved masks and needs no RNG)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(who.encode()) * 7_919 + step) % 2**63)
        yield


def _stats_row(prefix: str, q: torch.nn.Module) -> dict[str, float]:
    s = bit_stats(q)
    return {} if s is None else {f"{prefix}/{k}": v for k, v in s.items()}


# ----------------------------------------------------------------------------------- server


@dataclass
class _Round:
    index: int
    selected: set[str]
    task: WireMessage
    updates: dict[str, tuple[dict[str, torch.Tensor], float]] = field(default_factory=dict)
    losses: list[tuple[float, int]] = field(default_factory=list)


class SplitServer:
    """Main server (shared top, gradient gates) and fed server (FedAvg of client states)."""

    def __init__(self, cfg: RunConfig, model: SplitModel, test_data: Any, num_labels: int) -> None:
        self.cfg = cfg
        self.model = model
        self.test_data = test_data
        self.num_labels = num_labels
        sc = cfg.split
        self.grad_q = make_codec(sc, "grad", model.hidden, seed=cfg.seed)
        self.eval_act_q = make_codec(sc, "act", model.hidden)  # evaluation codes the cut as sent
        self.act_rx = make_receiver(sc, "act")
        self.grad_q.to(model.device)
        self.eval_act_q.to(model.device)
        self.schedule = bit_schedule(sc, total_steps(cfg))
        self.gates = gate_controller(sc, _gate_groups(model.top, grad=[self.grad_q]),
                                     self.schedule)  # fmt: skip
        lora = [p for n, p in model.top.named_parameters() if p.requires_grad and "gate" not in n]
        self.opt = lora_optimizer(lora, cfg.train)
        self.client_state = _client_state(model, self.eval_act_q)
        self._lock = threading.Lock()
        self._round: _Round | None = None
        self.steps = 0

    # -- round lifecycle (driver) ---------------------------------------------------------------
    def open_round(self, r: int, selected: list[int]) -> None:
        tensors = {k: raw(v) for k, v in self.client_state.items()}
        task = WireMessage("global", "", r, 0, {}, {}, tensors)
        with self._lock:
            self._round = _Round(r, {client_name(c) for c in selected}, task)

    def close_round(self, evaluate: bool) -> dict[str, Any]:
        with self._lock:
            rnd, self._round = self._round, None
        if rnd is None:
            raise FedqError("close_round called with no open round")
        if rnd.updates:
            total = sum(w for _, w in rnd.updates.values())
            self.client_state = {
                k: torch.stack([s[k] * (w / total) for s, w in rnd.updates.values()]).sum(0)
                for k in self.client_state
            }
        out: dict[str, Any] = {"round": rnd.index, "clients_ok": len(rnd.updates)}
        n = sum(c for _, c in rnd.losses)
        out["train_loss"] = sum(lo * c for lo, c in rnd.losses) / n if n else None
        out.update(self.bit_summary())
        if evaluate:
            out.update(self.evaluate())
        return out

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
    def evaluate(self, batch_size: int = 64) -> dict[str, float]:
        """Whole model with the averaged client state; activations quantized at the cut."""
        m = self.model
        _load_client_state(m, self.eval_act_q, self.client_state)
        was = m.full.training
        m.full.eval()
        data = self.test_data
        loss_sum, correct, count = 0.0, 0, 0
        for s in range(0, len(data), batch_size):
            idx = list(range(s, min(s + batch_size, len(data))))
            batch = m.make_batch([data.texts[i] for i in idx], data.y[idx])
            h = self.eval_act_q(m.bottom(batch))
            loss, c, n = m.top(h, batch["attention_mask"], batch["labels"])
            loss_sum += float(loss) * n
            correct, count = correct + c, count + n
        m.full.train(was)
        loss = loss_sum / max(count, 1)
        out = {"accuracy": correct / max(count, 1), "loss": loss}
        if m.task != CLASSIFY:
            out["perplexity"] = math.exp(min(loss, 50.0))
        return out

    # -- transport handler ----------------------------------------------------------------------
    def get_task(self, client_id: str, round: int) -> WireMessage:
        with self._lock:
            rnd = self._round
            if rnd is None or rnd.index != round or client_id not in rnd.selected:
                raise FedqError(f"no split task for {client_id} in round {round}")
            t = rnd.task
        return WireMessage(t.kind, client_id, t.round, 0, {}, {}, t.tensors)

    def push_update(self, msg: WireMessage) -> None:
        with self._lock:
            rnd = self._round
        if rnd is None or msg.round != rnd.index or msg.client_id not in rnd.selected:
            raise FedqError(f"unexpected client state from {msg.client_id} (round {msg.round})")
        if msg.kind != "update" or set(msg.tensors) != set(self.client_state):
            raise FedqError(f"client state from {msg.client_id} does not match the model")
        state = {k: dequantize(p).float() for k, p in msg.tensors.items()}
        for k, v in state.items():
            if v.shape != self.client_state[k].shape or not bool(torch.isfinite(v).all()):
                raise FedqError(f"client state from {msg.client_id}: bad tensor {k!r}")
        n = msg.scalars.get("num_samples", 0.0)
        if not (math.isfinite(n) and n > 0):
            raise FedqError(f"client state from {msg.client_id}: num_samples must be > 0")
        with self._lock:
            if self._round is not rnd or msg.client_id in rnd.updates:
                raise FedqError(f"late or duplicate client state from {msg.client_id}")
            rnd.updates[msg.client_id] = (state, n)

    def _decode_step(self, msg: WireMessage) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Validate an activations message and decode it: ``(received, mask, labels)``."""
        names = self.act_rx.wire_names | {"mask", "labels"}
        if msg.kind != "activations" or set(msg.tensors) != names:
            raise FedqError(f"expected activations {'/'.join(sorted(names))}, got {msg.kind!r} "
                            f"{sorted(msg.tensors)}")  # fmt: skip
        ph = msg.tensors["h"]
        m = self.model
        if len(ph.shape) != 3 or ph.shape[2] != m.hidden or not 1 <= ph.shape[1] <= m.max_length:
            raise FedqError(f"activations must be [B, T<={m.max_length}, {m.hidden}], "
                            f"got {list(ph.shape)}")  # fmt: skip
        b, t = ph.shape[0], ph.shape[1]
        mask = unpack_mask(msg.tensors["mask"]).to(m.device)
        labels = unpack_labels(msg.tensors["labels"], 0, self.num_labels).to(m.device)
        want = (b,) if m.task == CLASSIFY else (b, t)
        if tuple(mask.shape) != (b, t) or tuple(labels.shape) != want:
            raise FedqError(f"mask {list(mask.shape)} / labels {list(labels.shape)} do not fit h")
        with self._lock:  # a stateful receiver's per-peer state is shared by the streams
            received = self.act_rx.receive(msg.tensors, msg.client_id, m.device)
        return received, mask, labels

    def split_step(self, msg: WireMessage) -> WireMessage:
        """One server step (module docstring, 3-4). Thread-safe: steps are serialised."""
        received, mask, labels = self._decode_step(msg)
        with self._lock:
            h = received.value
            h.requires_grad_(True)
            with seeded_dropout(self.cfg.seed, "server:" + msg.client_id, msg.step, h.device):
                loss, correct, count = self.model.top(h, mask, labels)
            loss.backward()
            assert h.grad is not None
            coded = self.grad_q.send(h.grad)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.gates is not None:
                self.gates.step(msg.step)
            self.act_rx.settle(msg.client_id, received, ok=True)
            self.steps += 1
            if self._round is not None:
                self._round.losses.append((float(loss.detach()), count))
        pg = coded.tensors["g"]
        scalars = {"loss": float(loss.detach()), "correct": float(correct), "count": float(count),
                   "grad_rel_err": coded.stats["rel_err"], "grad_bits": pg.mean_bits()}  # fmt: skip
        for k, v in _stats_row("grad", self.grad_q).items():
            scalars[k.replace("/", "_")] = v
        return WireMessage(
            "gradients", msg.client_id, msg.round, msg.step, scalars, {}, coded.tensors
        )


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


def client_seed(seed: int, cid: int, r: int) -> int:
    return (seed * 1_000_003 + cid * 7_919 + r * 104_729) % (2**63 - 1)


class SplitClientWorker:
    """Runs the split steps of the logical clients placed on this worker (one model, whose
    client state is loaded from the server at the start of each client's round)."""

    def __init__(
        self,
        cfg: RunConfig,
        model: SplitModel,
        train_data: Any,
        partitions: list[torch.Tensor],
        connect: Callable[[str], SplitConnection],
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.data = train_data
        self.partitions = partitions
        self.connect = connect
        sc = cfg.split
        self.act_q = make_codec(sc, "act", model.hidden)
        self.act_q.to(model.device)
        self.grad_rx = make_receiver(sc, "grad")
        self.schedule = bit_schedule(sc, total_steps(cfg))
        self._conns: dict[int, SplitConnection] = {}
        self.dp: GaussianMechanism | None = None
        if dp_enabled(cfg):  # activation DP (fedq.split.privacy): same plan as the driver's
            z = planned_noise_multiplier(cfg, [int(p.numel()) for p in partitions])
            self.dp = GaussianMechanism(cfg.privacy.clip_norm, z)

    def _conn(self, cid: int) -> SplitConnection:
        if cid not in self._conns:
            self._conns[cid] = self.connect(client_name(cid))
        return self._conns[cid]

    def run_round(self, r: int, cids: list[int]) -> list[dict[str, Any]]:
        return [self.run_client(r, c) for c in cids]

    def run_client(self, r: int, cid: int) -> dict[str, Any]:
        conn = self._conn(cid)
        task = conn.get_task(r)
        _load_client_state(self.model, self.act_q, {k: dequantize(p) for k, p in
                                                   task.tensors.items()})  # fmt: skip
        lora = [p for n, p in self.model.bottom.named_parameters()
                if p.requires_grad and "gate" not in n]  # fmt: skip
        gates = gate_controller(self.cfg.split, _gate_groups(self.model.bottom, act=[self.act_q]),
                                self.schedule)  # fmt: skip
        opt = lora_optimizer(lora, self.cfg.train)
        idx = self.partitions[cid]
        gen = torch.Generator().manual_seed(client_seed(self.cfg.seed, cid, r))
        steps = []
        bs = self.cfg.train.batch_size
        order = idx[torch.randperm(idx.numel(), generator=gen)]
        noise = torch.Generator().manual_seed(client_seed(self.cfg.seed, cid, r) ^ _NOISE_STREAM)
        for s in range(self.cfg.split.local_steps):
            take = order[(torch.arange(bs) + s * bs) % max(order.numel(), 1)]
            step = r * self.cfg.split.local_steps + s
            steps.append(self.step(conn, opt, take, r, step, gates, noise))
        state = _client_state(self.model, self.act_q)
        n = float(idx.numel() or 1)
        msg = WireMessage("update", client_name(cid), r, 0, {"num_samples": n}, {},
                          {k: raw(v) for k, v in state.items()})  # fmt: skip
        sent0 = conn.bytes_sent
        conn.push_update(msg)
        return {"client": cid, "steps": steps, "state_bytes": conn.bytes_sent - sent0,
                "state_numel": sum(v.numel() for v in state.values())}  # fmt: skip

    def step(
        self, conn: SplitConnection, opt: torch.optim.Optimizer, take: torch.Tensor, r: int,
        step: int, gates: GateController | None = None, noise: torch.Generator | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """One split step (module docstring, 1, 2 and 5); returns its stats (``seconds``: wall
        time of the whole step, compute + coding + transfer)."""
        t0 = time.perf_counter()
        m = self.model
        batch = m.make_batch([self.data.texts[int(i)] for i in take], self.data.y[take])
        with seeded_dropout(self.cfg.seed, self._name(conn), step, m.device):
            h = m.bottom(batch)
        clipped = 0
        if self.dp is not None:  # clip + noise before quantization (fedq.split.privacy)
            assert noise is not None
            h, clipped = privatize_activations(h, self.dp, noise)
        coded = self.act_q.send(h, ids=take.tolist())
        ph = coded.tensors["h"]
        tensors = {**coded.tensors, "mask": pack_mask(batch["attention_mask"]),
                   "labels": pack_labels(batch["labels"])}  # fmt: skip
        msg = WireMessage("activations", self._name(conn), r, step, {}, {}, tensors)
        sent0, recv0 = conn.bytes_sent, conn.bytes_received
        try:
            reply = conn.split_step(msg)
            if reply.kind != "gradients" or set(reply.tensors) != self.grad_rx.wire_names:
                raise FedqError(f"expected a gradients reply, got {reply.kind!r}")
            pg = reply.tensors["g"]
            if tuple(pg.shape) != tuple(h.shape):
                raise FedqError(f"gradient shape {list(pg.shape)} != activations {list(h.shape)}")
            received = self.grad_rx.receive(reply.tensors, "server", coded.value.device)
        except Exception:
            self.act_q.settle(coded, ok=False)
            raise
        up, down = conn.bytes_sent - sent0, conn.bytes_received - recv0
        self.act_q.settle(coded, ok=True)  # the server took the step
        self.grad_rx.settle("server", received, ok=True)
        coded.value.backward(received.value.to(coded.value.dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gates is not None:
            gates.step(step)
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {
            "seconds": seconds,
            "step": step, "loss": reply.scalars.get("loss"), "bytes_up": up, "bytes_down": down,
            "numel": h.numel(), "act_bits": ph.mean_bits(), "grad_bits": pg.mean_bits(),
            "act_payload": ph.payload_nbytes, "act_meta": ph.metadata_nbytes,
            "grad_payload": pg.payload_nbytes, "grad_meta": pg.metadata_nbytes,
        }  # fmt: skip
        if self.dp is not None:
            row["dp_clipped_frac"] = clipped / max(int(h.shape[0]), 1)
        row.update(_stats_row("bits/cut/act", self.act_q))
        for k in ("mean", "min", "max"):
            if f"grad_{k}" in reply.scalars:
                row[f"bits/cut/grad/{k}"] = reply.scalars[f"grad_{k}"]
        bounds: Any = self.model.bottom.boundaries
        for i, b in enumerate(bounds):
            row |= _stats_row(f"bits/b{i}/act", b.act_q) | _stats_row(f"bits/b{i}/grad", b.grad_q)
        return row

    @staticmethod
    def _name(conn: SplitConnection) -> str:
        return str(getattr(conn, "client_id", ""))


def packed_nbytes(p: PackedTensor) -> int:
    """Payload + declared metadata of one packed tensor."""
    return p.payload_nbytes + p.metadata_nbytes


class LoopbackSplitConnection:
    """In-process :class:`SplitConnection`: messages go through the real wire framing (serialize,
    chunk, reassemble, validate) and bytes are counted as the gRPC transport counts them, frames'
    ``ByteSize()`` (plus TaskRequest / Ack for the FedAvg exchange)."""

    def __init__(self, server: SplitServer, client_id: str) -> None:
        from fedq.wire.limits import WireLimits

        self.server = server
        self.client_id = client_id
        self.limits = WireLimits()
        self.bytes_sent = 0
        self.bytes_received = 0

    def _roundtrip(self, msg: WireMessage) -> tuple[WireMessage, int]:
        from fedq.wire.message import message_from_frames, message_to_frames

        frames = list(message_to_frames(msg, self.limits.chunk_size))
        return message_from_frames(frames, self.limits), sum(f.ByteSize() for f in frames)

    def get_task(self, round: int) -> WireMessage:
        from fedq.wire.pb import service_pb2

        self.bytes_sent += service_pb2.TaskRequest(client_id=self.client_id, round=round).ByteSize()
        reply, n = self._roundtrip(self.server.get_task(self.client_id, round))
        self.bytes_received += n
        return reply

    def push_update(self, msg: WireMessage) -> int:
        from fedq.wire.pb import service_pb2

        decoded, n = self._roundtrip(msg)
        self.server.push_update(decoded)
        self.bytes_sent += n
        self.bytes_received += service_pb2.Ack(accepted=True, bytes_received=n).ByteSize()
        return n

    def split_step(self, msg: WireMessage) -> WireMessage:
        decoded, up = self._roundtrip(msg)
        reply, down = self._roundtrip(self.server.split_step(decoded))
        self.bytes_sent += up
        self.bytes_received += down
        return reply
