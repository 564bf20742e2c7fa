"""``fedq simulate`` with ``mode: split``: SplitFed over real gRPC on the runtime's backend.

Same shape as :func:`fedq.runtime.simulate.simulate`: a server host (the :class:`SplitServer`
behind a :class:`~fedq.transport.TransportServer` that serves ``Split`` and ``Federated``) and K
worker hosts running the logical clients (client ``c`` on worker ``c % K``), as Ray actors or in
process. Each round: the server opens the round (client state to download), the workers run
``split.local_steps`` steps per selected client over one bidi stream each and upload their client
state, the server averages it (FedAvg) and evaluates when due. Clients on different workers run
concurrently; the server serialises their steps on its shared top (SFL-V2, docs/algorithms.md §4).

Files (docs/design.md §5): ``config.json``, ``metrics.jsonl`` (one record per round:
``round``, ``step``, ``accuracy``, ``loss``, ``bytes_up``/``bytes_down`` as counted by the server's
transport, ``bytes_fp32``, ``mean_bits`` of the cut payloads' codes as sent, ``act_wire_bits`` /
``grad_wire_bits`` (all bytes of each tensor, metadata and float16 outlier rows included, per
value), ``epsilon`` (the worst
client's with ``privacy.mechanism: activations``, None without DP; the run stops before a round
that would exceed ``privacy.target_epsilon``, reason in ``summary.json``),
``bits/<boundary>/<dir>/{mean,min,max}``), ``bits.jsonl`` (the same bit stats per client step),
``bit_maps.json`` (final per-channel bits), ``summary.json`` and ``report.png``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedq.config import RunConfig
from fedq.errors import PrivacyBudgetExceeded
from fedq.runtime.backend import make_backend, stop_all
from fedq.runtime.setup import quiet_process, torch_device
from fedq.split.privacy import ActivationAccounting
from fedq.split.privacy import enabled as dp_enabled
from fedq.split.protocol import client_name

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]


def _build(cfg: RunConfig, split: Any) -> Any:
    from fedq.split.codecs import boundary_factory
    from fedq.split.models import build_split_model

    m, sc = cfg.model, cfg.split
    model = build_split_model(
        m.name, cut=sc.cut, num_classes=int(split.train.num_classes), seed=cfg.seed,
        lora_r=m.lora_r, max_length=m.max_length, hidden=m.hidden, tiny_layers=sc.tiny_layers,
        make_boundary=boundary_factory(sc, _hidden_of(cfg)),
    )  # fmt: skip
    return model.to(torch_device(cfg.runtime.device))


def _hidden_of(cfg: RunConfig) -> int:
    """Width of the residual stream, known before building (needed by the boundary factory)."""
    return {"minilm_lora": 384, "smollm2_lora": 576}.get(cfg.model.name, cfg.model.hidden)


def _num_labels(model: Any, split: Any) -> int:
    from fedq.split.models import CLASSIFY

    return int(split.train.num_classes) if model.task == CLASSIFY else len(model.tokenizer)


class SplitServerHost:
    def __init__(self, cfg: RunConfig, tokens: dict[str, str]) -> None:
        quiet_process(cfg.runtime.threads_per_worker)
        from fedq.runtime.setup import client_partitions, load_data
        from fedq.split.protocol import SplitServer
        from fedq.transport.server import TransportServer

        split = load_data(cfg)
        model = _build(cfg, split)
        self.client_sizes = [int(p.numel()) for p in client_partitions(cfg, split.train)]
        self.server = SplitServer(cfg, model, split.test, _num_labels(model, split))
        self.transport = TransportServer(self.server, host="127.0.0.1", port=0, tokens=tokens,
                                         max_workers=cfg.fed.num_clients + 4)  # fmt: skip
        self.state_numel = sum(v.numel() for v in self.server.client_state.values())

    def start(self) -> str:
        self.transport.start()
        return str(self.transport.address)

    def info(self) -> dict[str, Any]:
        return {"trainable_params": self.state_numel, "task": self.server.model.task,
                "client_sizes": self.client_sizes}  # fmt: skip

    def open_round(self, r: int, selected: list[int]) -> None:
        self.transport.counters.take()
        self.server.open_round(r, selected)

    def close_round(self, evaluate: bool) -> dict[str, Any]:
        out = self.server.close_round(evaluate)
        traffic = self.transport.counters.take()
        out["bytes_up"], out["bytes_down"] = int(traffic["bytes_up"]), int(traffic["bytes_down"])
        return out

    def bit_maps(self) -> dict[str, list[int]]:
        return self.server.bit_maps()

    def stop(self) -> None:
        self.transport.stop(0.5)


class SplitWorkerHost:
    def __init__(self, cfg: RunConfig, address: str, tokens: dict[str, str]) -> None:
        quiet_process(cfg.runtime.threads_per_worker)
        from fedq.runtime.setup import client_partitions, load_data
        from fedq.split.protocol import SplitClientWorker
        from fedq.transport.client import TransportClient
        from fedq.wire.limits import WireLimits

        split = load_data(cfg)
        parts = client_partitions(cfg, split.train)
        model = _build(cfg, split)
        limits = WireLimits(chunk_size=cfg.runtime.chunk_bytes)

        def connect(name: str) -> Any:
            return TransportClient(address, client_id=name, token=tokens[name], limits=limits)

        self.worker = SplitClientWorker(cfg, model, split.train, parts, connect)

    def ready(self) -> bool:
        return True

    def run_round(self, r: int, cids: list[int]) -> list[dict[str, Any]]:
        return self.worker.run_round(r, cids)


def _select(cfg: RunConfig, r: int) -> list[int]:
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + r)
    perm = torch.randperm(cfg.fed.num_clients, generator=g)[: cfg.fed.clients_per_round]
    return sorted(int(c) for c in perm)


def round_record(cfg: RunConfig, r: int, server_out: dict[str, Any],
                 results: list[dict[str, Any]], state_numel: int) -> dict[str, Any]:  # fmt: skip
    """One metrics.jsonl record from the server's round summary and the clients' step stats."""
    steps = [s for res in results for s in res["steps"]]
    numel = sum(s["numel"] for s in steps)
    bits = sum((s["act_bits"] + s["grad_bits"]) * s["numel"] for s in steps)
    rec = dict(server_out)
    rec["step"] = (r + 1) * cfg.split.local_steps
    rec["bytes_fp32"] = 2 * 4 * numel + 2 * 4 * state_numel * len(results)
    rec["mean_bits"] = bits / (2 * numel) if numel else None
    rec["act_bits"] = sum(s["act_bits"] * s["numel"] for s in steps) / numel if numel else None
    rec["grad_bits"] = sum(s["grad_bits"] * s["numel"] for s in steps) / numel if numel else None
    # everything the activation / gradient tensors put on the wire (codes, scales, offsets, bit
    # maps, row scales, float16 outlier rows), in bits per value: what mean_bits does not show
    for d in ("act", "grad"):
        nbytes = sum(s[f"{d}_payload"] + s[f"{d}_meta"] for s in steps if f"{d}_meta" in s)
        rec[f"{d}_wire_bits"] = 8 * nbytes / numel if numel else None
    rec["step_bytes_up"] = sum(s["bytes_up"] for s in steps) / max(len(steps), 1)
    rec["step_bytes_down"] = sum(s["bytes_down"] for s in steps) / max(len(steps), 1)
    rec["state_bytes"] = sum(res["state_bytes"] for res in results)
    rec.setdefault("accuracy", None)
    rec.setdefault("loss", None)
    rec["epsilon"] = None
    clipped = [s["dp_clipped_frac"] for s in steps if "dp_clipped_frac" in s]
    if clipped:
        rec["dp_clipped_frac"] = sum(clipped) / len(clipped)
    return rec


def run_split(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    on_start: Callback | None = None,
    on_round: Callback | None = None,
) -> dict[str, Any]:
    """Run a split / SplitFed scenario; write the run files (module docstring)."""
    from fedq.report import MetricsWriter, summarize, write_config, write_summary
    from fedq.split.report import plot_split_report

    if not cfg.runtime.ray_address:  # local hosts: a missing GPU is a config error, said now
        torch_device(cfg.runtime.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg.to_dict())
    for name in ("metrics.jsonl", "bits.jsonl"):
        (out / name).unlink(missing_ok=True)
    writer = MetricsWriter(out)
    t0 = time.perf_counter()
    tokens = {client_name(i): secrets.token_urlsafe(24) for i in range(cfg.fed.num_clients)}
    backend = make_backend(cfg.runtime)
    server: Any = None
    interrupted = False
    stopped: str | None = None
    accounting: Any = None
    bit_maps: dict[str, list[int]] = {}
    try:
        server = backend.spawn(SplitServerHost, cfg, tokens)
        address = backend.get([backend.call(server, "start")])[0]
        k = max(1, min(cfg.runtime.workers or os.cpu_count() or 1, cfg.fed.clients_per_round))
        workers = [backend.spawn(SplitWorkerHost, cfg, address, tokens) for _ in range(k)]
        backend.get([backend.call(w, "ready") for w in workers])
        info = backend.get([backend.call(server, "info")])[0]
        info.update(address=address, workers=k, backend=backend.name, start_round=0,
                    startup_seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
        if dp_enabled(cfg):  # activation DP: per-client accountants (fedq.split.privacy)
            accounting = ActivationAccounting(cfg, info["client_sizes"])
            info["privacy"] = accounting.plan()
        if on_start:
            on_start(info)
        cum = 0
        with (out / "bits.jsonl").open("a") as bits_file:
            for r in range(cfg.fed.rounds):
                tr = time.perf_counter()
                ids = _select(cfg, r)
                if accounting is not None:
                    try:  # charged before any release; stop before exceeding the target
                        accounting.check_and_charge(ids)
                    except PrivacyBudgetExceeded as e:
                        stopped = str(e)
                        log.warning("stopping before round %d: %s", r, stopped)
                        break
                backend.get([backend.call(server, "open_round", r, ids)])
                futures = [backend.call(w, "run_round", r, [c for c in ids if c % k == i])
                           for i, w in enumerate(workers)]  # fmt: skip
                results = [x for batch in backend.get(futures) for x in batch]
                due = (r + 1) % cfg.fed.eval_every == 0 or r + 1 == cfg.fed.rounds
                srv = backend.get([backend.call(server, "close_round", due)])[0]
                rec = round_record(cfg, r, srv, results, info["trainable_params"])
                if accounting is not None:
                    rec["epsilon"] = accounting.epsilon()
                cum += rec["bytes_up"] + rec["bytes_down"]
                rec["cum_bytes"] = cum
                rec["seconds"] = round(time.perf_counter() - tr, 3)
                writer.write(rec)
                for res in results:
                    for s in res["steps"]:
                        bits_file.write(
                            json.dumps({"round": r, "client": res["client"], **s}) + "\n"
                        )
                if on_round:
                    on_round(rec)
        bit_maps = backend.get([backend.call(server, "bit_maps")])[0]
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: keeping metrics of finished rounds")
    finally:
        stop_all(backend, server)
        writer.close()
    (out / "bit_maps.json").write_text(json.dumps(bit_maps) + "\n")
    records = writer.records
    extra = {"interrupted": interrupted, "name": cfg.name, "mode": "split",
             "final_mean_bits": records[-1]["mean_bits"] if records else None,
             "stopped_reason": stopped,
             "privacy": accounting.plan() if accounting is not None else {"mechanism": "none"},
             "epsilon": accounting.epsilon() if accounting is not None else None}  # fmt: skip
    summary = summarize(records, wall_seconds=time.perf_counter() - t0, extra=extra)
    write_summary(out, summary)
    plot_split_report(records, bit_maps, out / "report.png", steps_path=out / "bits.jsonl")
    return summary
