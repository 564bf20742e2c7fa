"""Client side: many logical clients multiplexed on one worker (a virtual client engine).

Per-client state (uplink codec: bit-policy state, error-feedback residuals, RNG) lives in a dict
keyed by client index and persists between rounds, so 100 logical clients need only a few worker
processes. Clients reach the server only through a connection object (gRPC or loopback), so the
bytes, codecs and failures are the real ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedq.adapt import BitContext
from fedq.codec import dequantize
from fedq.config import RunConfig
from fedq.errors import FedqError
from fedq.fed.pipeline import LinkCodec
from fedq.fed.privacy import privatize_update
from fedq.fed.server import client_name
from fedq.fed.train import local_train, make_optimizer
from fedq.wire.message import WireMessage

log = logging.getLogger(__name__)


class Connection(Protocol):
    bytes_sent: int
    bytes_received: int

    def get_task(self, round: int) -> WireMessage: ...

    def push_update(self, msg: WireMessage) -> int: ...


@dataclass
class ClientState:
    uplink: LinkCodec
    rounds_done: int = 0


def client_seed(seed: int, cid: int, r: int) -> int:
    """Per (client, round) RNG seed: results do not depend on which worker runs a client."""
    return (seed * 1_000_003 + cid * 7_919 + r * 104_729) % (2**63 - 1)


class ClientWorker:
    """Runs the local rounds of the logical clients assigned to this worker."""

    def __init__(
        self,
        cfg: RunConfig,
        bundle: Any,
        train_data: Any,
        partitions: list[torch.Tensor],
        connect: Callable[[str], Connection],
    ) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.data = train_data
        self.partitions = partitions
        self.connect = connect
        self.states: dict[int, ClientState] = {}
        self._conns: dict[int, Connection] = {}
        labels = train_data.y
        k = int(train_data.num_classes)
        self._hist = [torch.bincount(labels[idx], minlength=k).tolist() for idx in partitions]

    def _state(self, cid: int) -> ClientState:
        if cid not in self.states:
            link = self.cfg.compression.uplink
            self.states[cid] = ClientState(LinkCodec(link, seed=client_seed(self.cfg.seed, cid, 0)))
        return self.states[cid]

    def _conn(self, cid: int) -> Connection:
        if cid not in self._conns:
            self._conns[cid] = self.connect(client_name(cid))
        return self._conns[cid]

    def run_round(self, r: int, cids: list[int]) -> list[dict[str, Any]]:
        """Run clients ``cids`` for round ``r``; a failing client is reported, not raised."""
        out = []
        for cid in cids:
            try:
                out.append(self.run_client(r, cid))
            except FedqError as e:
                log.warning("client %d failed in round %d: %s", cid, r, e)
                out.append({"client": cid, "ok": False, "error": str(e)})
        return out

    def run_client(self, r: int, cid: int) -> dict[str, Any]:
        conn = self._conn(cid)
        sent0, recv0 = conn.bytes_sent, conn.bytes_received
        task = conn.get_task(r)
        start = {k: dequantize(p) for k, p in task.tensors.items()}
        self.bundle.load_trainable_state(start)
        start = {k: v.detach().clone() for k, v in self.bundle.trainable_state().items()}
        idx = self.partitions[cid]
        gen = torch.Generator().manual_seed(client_seed(self.cfg.seed, cid, r))
        mechanism = task.tags.get("dp_mechanism", "none")
        loss, steps, laplace_sensitivity = self._train(task, idx, gen, mechanism)
        trained = self.bundle.trainable_state()
        delta = {k: (trained[k].detach().float() - start[k].float()) for k in start}
        # The one fixed order: clip -> noise here, then bits -> quantize in the uplink codec.
        delta, update_norm = privatize_update(
            delta, mechanism, task.scalars, gen, laplace_sensitivity=laplace_sensitivity
        )
        ctx = BitContext(
            round=r,
            total_rounds=int(task.scalars.get("total_rounds", self.cfg.fed.rounds)),
            num_samples=int(idx.numel()),
            max_samples=int(task.scalars.get("max_samples", idx.numel())),
            label_counts=tuple(self._hist[cid]),
        )
        state = self._state(cid)
        packed, stats = state.uplink.encode(delta, ctx)
        scalars = {
            "update_norm": update_norm if math.isfinite(update_norm) else -1.0,
            "num_samples": float(idx.numel()),
            "loss": loss,
            "steps": float(steps),
            "mean_bits": stats.mean_bits,
            "fp32_bytes": float(stats.fp32_bytes),
        }
        msg = WireMessage("update", client_name(cid), r, 0, scalars, {}, packed)
        conn.push_update(msg)
        state.rounds_done += 1
        return {
            "client": cid,
            "ok": True,
            "numel": stats.numel,
            "wire_up": conn.bytes_sent - sent0,  # as counted by the client's own transport
            "wire_down": conn.bytes_received - recv0,
            **scalars,
        }

    def _train(
        self, task: WireMessage, idx: torch.Tensor, gen: torch.Generator, mechanism: str
    ) -> tuple[float, int, float | None]:
        """Local training as the privacy mechanism requires: (loss, steps, laplace sensitivity)."""
        tc = self.cfg.train
        if mechanism == "dpsgd":
            from fedq.privacy import dp_local_train

            res = dp_local_train(
                self.bundle,
                self.data,
                idx,
                batch_size=tc.batch_size,
                epochs=tc.local_epochs,
                noise_multiplier=task.scalars["dp_noise_multiplier"],
                max_grad_norm=task.scalars["dp_clip"],
                generator=gen,
                optimizer_factory=lambda ps: make_optimizer(ps, tc),
                grad_sample_mode=self.cfg.privacy.grad_sample_mode,
            )
            return res.loss, res.steps, None
        paper = mechanism == "laplace" and task.tags.get("laplace_calibration") == "paper"
        smooth = None
        if paper:
            from fedq.privacy import SmoothnessEstimator

            smooth = SmoothnessEstimator()
        loss, steps = local_train(
            self.bundle,
            self.data,
            idx,
            tc,
            generator=gen,
            proximal_mu=task.scalars.get("proximal_mu", 0.0),
            grad_clip_l1=task.scalars["dp_clip"] if paper else None,
            smoothness=smooth,
        )
        if smooth is None:
            return loss, steps, None
        from fedq.privacy import laplace_sensitivity

        s = laplace_sensitivity(
            task.scalars["dp_clip"], tc.lr, tc.local_epochs, int(idx.numel()), smooth.value
        )
        return loss, steps, s

    def state_dict(self) -> dict[int, Any]:
        return {
            cid: {"uplink": s.uplink.state_dict(), "rounds_done": s.rounds_done}
            for cid, s in self.states.items()
        }

    def load_state_dict(self, state: dict[int, Any]) -> None:
        for cid, s in state.items():
            st = self._state(int(cid))
            st.uplink.load_state_dict(s["uplink"])
            st.rounds_done = int(s["rounds_done"])
