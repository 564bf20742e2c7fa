"""Client side of federated rounds: a :class:`~fedq.rounds.node.TaskRunner` for any number of
logical clients (a virtual client engine).

Per-client state (uplink codec: bit-policy state, error-feedback residuals, RNG) lives in a dict
keyed by client id and persists between rounds, so many logical clients need only a few worker
processes; a ``fedq join`` process runs one. A client's state is made when it first runs a task,
so of a large pool only the clients ever selected hold state, and a checkpoint can take just the
states that changed since the previous one (:meth:`ClientWorker.changes`). Each client's
randomness is seeded from its roster index, so a client gives the same update whichever process
runs it. Clients reach the server only through a connection object (gRPC, or the loopback in
tests), so the bytes, codecs and failures are the real ones. Before a client starts a round its
state is kept; a task for the same round coming back (the server restarted and re-opened it)
starts again from that state, so the update is the one the uninterrupted run would have sent.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedq.adapt import BitContext
from fedq.codec import dequantize
from fedq.config import RunConfig
from fedq.data.datasets import Shard
from fedq.fed.pipeline import LinkCodec
from fedq.fed.privacy import ServerPrivacy, mechanism_class
from fedq.fed.train import local_train, make_optimizer
from fedq.models.rng import seeded_forward
from fedq.rounds import client_seed
from fedq.rounds.node import Connection
from fedq.wire.control import Assignment
from fedq.wire.message import WireMessage

log = logging.getLogger(__name__)


@dataclass
class ClientState:
    uplink: LinkCodec
    rounds_done: int = 0
    accountant: Any = None  # DP-SGD: this client's own Opacus accountant (epsilon it reports)


class ClientWorker:
    """Runs the rounds of the logical clients in ``shards`` (module docstring). ``index`` maps
    client id to its roster index (the server's answer to registration)."""

    def __init__(
        self,
        cfg: RunConfig,
        bundle: Any,
        shards: Mapping[str, Shard],
        index: Mapping[str, int],
    ) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.index = dict(index)
        self.shards: dict[str, Shard] = {}
        self.holdout: dict[str, Shard] = {}  # data.site_holdout: rows kept out of training
        for cid, shard in shards.items():
            self.shards[cid], held = site_holdout(shard, cfg, self.index[cid])
            if held is not None:
                self.holdout[cid] = held
        self.states: dict[str, ClientState] = {}
        self._before: dict[str, tuple[int, dict[str, Any]]] = {}  # client -> (round, state)
        self._running: str | None = None
        self._hist: dict[str, list[int]] = {}
        self._tick = 0  # counts finished tasks (update encoded, about to be uploaded)
        self._changed: dict[str, int] = {}  # client -> tick of its last finished task
        self._lock = threading.Lock()  # a finished task vs. a checkpoint reading the changes

    def _state(self, cid: str) -> ClientState:
        if cid not in self.states:
            link = self.cfg.compression.uplink
            seed = client_seed(self.cfg.seed, self.index[cid], 0)
            self.states[cid] = ClientState(LinkCodec(link, seed=seed))
        return self.states[cid]

    def _label_counts(self, cid: str) -> tuple[int, ...]:
        if cid not in self._hist:
            sh = self.shards[cid]
            k = int(sh.data.num_classes)
            self._hist[cid] = torch.bincount(sh.data.y[sh.idx], minlength=k).tolist()
        return tuple(self._hist[cid])

    def round_closed(self, r: int) -> None:
        self._before = {c: v for c, v in self._before.items() if v[0] >= r}

    def run(self, task: Assignment, conn: Connection) -> dict[str, Any]:
        """One client's round: download, train, privatize, encode, upload."""
        cid, r = task.client_id, task.round
        if cid not in self.shards:
            raise KeyError(f"{cid} is not hosted here")
        before = self._before.get(cid)
        if before is not None and before[0] == r:  # the same round again: start where it began
            self._load_client(cid, before[1])
        else:
            self._before[cid] = (r, self._client_state(cid))
        self._running = cid
        try:
            with seeded_forward(self.cfg.seed, cid, r, self.bundle.device):
                return self._run(cid, r, conn)
        finally:
            self._finished(cid)

    def _finished(self, cid: str) -> None:
        """``cid``'s state is final for its task: it counts as changed, no longer as running."""
        with self._lock:
            if self._running == cid:
                self._tick += 1
                self._changed[cid] = self._tick
                self._running = None

    def _run(self, cid: str, r: int, conn: Connection) -> dict[str, Any]:
        sent0, recv0 = conn_bytes(conn, cid)
        task = conn.get_task(r, cid)
        start = {k: dequantize(p, device=self.bundle.device) for k, p in task.tensors.items()}
        self.bundle.load_trainable_state(start)
        start = {k: v.detach().clone() for k, v in self.bundle.trainable_state().items()}
        shard = self.shards[cid]
        index = self.index[cid]
        gen = torch.Generator().manual_seed(client_seed(self.cfg.seed, index, r))
        # Run settings come from the resolved configuration the client got at registration
        # (the task's tags repeat them for other implementations); numbers the server decides
        # per round (planned noise, clip, total rounds, largest shard) come as its scalars.
        site = self._site_evaluation(cid, r)  # the model this round starts from
        mechanism = mechanism_class(self.cfg.privacy.mechanism)
        loss, steps, laplace_sensitivity, epsilon = self._train(cid, task, shard, gen, mechanism)
        trained = self.bundle.trainable_state()
        delta = {k: (trained[k].detach().float() - start[k].float()) for k in start}
        # The one fixed order: clip -> noise here, then bits -> quantize in the uplink codec.
        delta, update_norm = mechanism.privatize(
            delta, task.scalars, gen, laplace_sensitivity=laplace_sensitivity
        )
        ctx = BitContext(
            round=r,
            total_rounds=int(task.scalars.get("total_rounds", self.cfg.rounds.count)),
            num_samples=shard.size,
            max_samples=int(task.scalars.get("max_samples", shard.size)),
            label_counts=self._label_counts(cid),
        )
        state = self._state(cid)
        packed, stats = state.uplink.encode(delta, ctx)
        scalars = {
            "update_norm": update_norm if math.isfinite(update_norm) else -1.0,
            "num_samples": float(shard.size),
            "loss": loss,
            "steps": float(steps),
            "mean_bits": stats.mean_bits,
            "fp32_bytes": float(stats.fp32_bytes),
        }
        if epsilon is not None:  # accounted where the data is, reported with the update
            scalars["dp_epsilon"] = epsilon
        scalars.update(site)
        state.rounds_done += 1
        self._finished(cid)  # before the upload: once it is accepted, a checkpoint sees this state
        conn.push_update(WireMessage.update(cid, r, packed, scalars=scalars))
        sent1, recv1 = conn_bytes(conn, cid)
        return {"wire_up": sent1 - sent0, "wire_down": recv1 - recv0, "loss": loss}

    def _site_evaluation(self, cid: str, r: int) -> dict[str, float]:
        """In an evaluation round, the loaded model on this client's held-out rows, as update
        scalars (``site_loss``, ``site_count``: rows, or a causal LM's answer tokens, and
        ``site_correct`` for a classifier); nothing otherwise."""
        held = self.holdout.get(cid)
        rc = self.cfg.rounds
        if held is None or not ((r + 1) % rc.eval_every == 0 or r + 1 == rc.count):
            return {}
        from fedq.fed.train import evaluation

        ev = evaluation(self.bundle, held.data.subset(held.idx))
        if self.bundle.task == "causal_lm":
            return {"site_loss": ev["loss"], "site_count": float(ev["eval_tokens"])}
        n = float(held.size)
        return {"site_loss": ev["loss"], "site_count": n, "site_correct": ev["accuracy"] * n}

    def _train(
        self,
        cid: str,
        task: WireMessage,
        shard: Shard,
        gen: torch.Generator,
        mechanism: type[ServerPrivacy],
    ) -> tuple[float, int, float | None, float | None]:
        """Local training as the privacy mechanism requires: (loss, steps, laplace sensitivity,
        DP-SGD epsilon this client has spent, by its own accountant)."""
        tc = self.cfg.train
        if mechanism.local_dpsgd:
            from fedq.privacy import dp_local_train

            res = dp_local_train(
                self.bundle,
                shard.data,
                shard.idx,
                batch_size=tc.batch_size,
                epochs=tc.local_epochs,
                noise_multiplier=task.scalars["dp_noise_multiplier"],
                max_grad_norm=task.scalars["dp_clip"],
                generator=gen,
                optimizer_factory=lambda ps: make_optimizer(ps, tc),
                grad_sample_mode=self.cfg.privacy.grad_sample_mode,
            )
            return res.loss, res.steps, None, self._account(cid, res)
        paper = mechanism.smoothness_calibrated(self.cfg.privacy.laplace_calibration)
        smooth = None
        if paper:
            from fedq.privacy import SmoothnessEstimator

            smooth = SmoothnessEstimator()
        loss, steps = local_train(
            self.bundle,
            shard.data,
            shard.idx,
            tc,
            generator=gen,
            proximal_mu=task.scalars.get("proximal_mu", 0.0),
            grad_clip_l1=task.scalars["dp_clip"] if paper else None,
            smoothness=smooth,
        )
        if smooth is None:
            return loss, steps, None, None
        from fedq.privacy import laplace_sensitivity

        s = laplace_sensitivity(
            task.scalars["dp_clip"], tc.lr, tc.local_epochs, shard.size, smooth.value
        )
        return loss, steps, s, None

    def _account(self, cid: str, res: Any) -> float:
        """Charge this client's own accountant for the round's DP-SGD steps; its epsilon."""
        from fedq.privacy import GaussianAccountant

        st = self._state(cid)
        if st.accountant is None:
            p = self.cfg.privacy
            st.accountant = GaussianAccountant(p.accountant, p.delta)
        st.accountant.step(res.noise_multiplier, res.sample_rate, res.steps)
        return float(st.accountant.epsilon())

    # -- state (checkpoints; a re-run round starts from its saved state) ----------------------
    def _client_state(self, cid: str) -> dict[str, Any]:
        st = self._state(cid)
        acc = None if st.accountant is None else st.accountant.state_dict()
        return copy.deepcopy(
            {"uplink": st.uplink.state_dict(), "rounds_done": st.rounds_done, "accountant": acc}
        )

    def _load_client(self, cid: str, s: Mapping[str, Any]) -> None:
        st = self._state(cid)
        st.uplink.load_state_dict(copy.deepcopy(dict(s["uplink"])))
        st.rounds_done = int(s["rounds_done"])
        st.accountant = None
        if s.get("accountant") is not None:
            from fedq.privacy import GaussianAccountant

            p = self.cfg.privacy
            st.accountant = GaussianAccountant(p.accountant, p.delta)
            st.accountant.load_state_dict(copy.deepcopy(s["accountant"]))

    def state_dict(self) -> dict[str, Any]:
        """Every client's state; a client in the middle of a round counts as it was before."""
        running = self._running
        out = {cid: self._client_state(cid) for cid in self.states}
        if running is not None and running in self._before:
            out[running] = self._before[running][1]
        return out

    def changes(self, since: int) -> tuple[int, dict[str, Any]]:
        """``(mark, states)``: the states (as :meth:`state_dict` gives them) of the clients that
        finished a task after the ``mark`` returned by an earlier call (``since=0``: every client
        that ran here); pass ``mark`` next time. A task is finished once its update is encoded,
        before the upload; a client still short of that counts as it was before its task, and
        comes again once it is done."""
        with self._lock:
            mark, running = self._tick, self._running
            changed = [cid for cid, t in self._changed.items() if t > since]
        out = {cid: self._client_state(cid) for cid in changed if cid != running}
        if running is not None and running in self._before:
            out[running] = self._before[running][1]
        return mark, out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for cid, s in state.items():
            if cid in self.shards:
                self._load_client(str(cid), s)


#: XOR-ed into a client's seed for the draw of its held-out rows (fixed for the run).
_HOLDOUT_STREAM = 0x51_7E_E7


def site_holdout(shard: Shard, cfg: RunConfig, index: int) -> tuple[Shard, Shard | None]:
    """``(training rows, held-out rows)`` of a client's shard: ``data.site_holdout`` of its rows
    (at least one, and at least one left to train on), drawn by its seed, the same every round
    and in every process; ``(shard, None)`` when off or the shard is too small."""
    frac = cfg.data.site_holdout
    k = min(max(1, round(frac * shard.size)), shard.size - 1) if frac > 0 else 0
    if k < 1:
        return shard, None
    gen = torch.Generator().manual_seed(client_seed(cfg.seed, index, 0) ^ _HOLDOUT_STREAM)
    perm = torch.randperm(shard.size, generator=gen)
    keep = torch.sort(perm[k:]).values  # training rows in their original order
    return Shard(shard.data, shard.idx[keep]), Shard(shard.data, shard.idx[perm[:k]])


def conn_bytes(conn: Any, client_id: str) -> tuple[int, int]:
    """Bytes ``conn`` has counted for ``client_id`` so far (sent, received)."""
    row = conn.counters.snapshot()["clients"].get(client_id, {})
    return int(row.get("bytes_up", 0)), int(row.get("bytes_down", 0))
