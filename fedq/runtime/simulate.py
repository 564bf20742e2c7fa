"""``fedq simulate``: a whole federated run on one machine, every tensor over real gRPC.

The driver only orchestrates: it opens a round on the server host, fans the selected logical
clients out to the worker hosts (client ``c`` always runs on worker ``c % K``, so its state stays
put), closes the round, writes one metrics record and a checkpoint per round as it goes (Ctrl-C
keeps them), and can resume from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedq.config import RunConfig
from fedq.fed.server import client_name
from fedq.runtime.backend import make_backend, stop_all
from fedq.runtime.checkpoint import load_checkpoint, save_checkpoint
from fedq.runtime.hosts import ServerHost, WorkerHost
from fedq.runtime.preflight import preflight

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]


def num_workers(cfg: RunConfig) -> int:
    k = cfg.runtime.workers or os.cpu_count() or 1
    return max(1, min(k, cfg.fed.num_clients))


def simulate(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    on_start: Callback | None = None,
    on_round: Callback | None = None,
) -> dict[str, Any]:
    """Run ``cfg``; write config.json, metrics.jsonl, summary.json, report.png and a checkpoint.

    With ``resume`` the run continues after the last checkpointed round of ``out_dir`` (model,
    strategy, codec and client states, and any privacy ledger are restored, never reset).
    """
    preflight(cfg)  # names and data problems: one ConfigError before any host starts
    if cfg.mode == "split":
        from fedq.runtime.split_runner import run_split

        return run_split(cfg, out_dir, on_start=on_start, on_round=on_round)
    from fedq.report import (
        MetricsWriter,
        plot_report,
        read_metrics,
        summarize,
        write_config,
        write_summary,
    )

    out = Path(out_dir)
    ckpt = load_checkpoint(out) if resume else None
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg.to_dict())
    if not resume and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    writer = MetricsWriter(out)
    t0 = time.perf_counter()
    tokens = {client_name(i): secrets.token_urlsafe(24) for i in range(cfg.fed.num_clients)}
    backend = make_backend(cfg.runtime)
    interrupted = False
    stopped: str | None = None
    server: Any = None
    try:
        server = backend.spawn(ServerHost, cfg, tokens)
        address = backend.get([backend.call(server, "start")])[0]
        k = num_workers(cfg)
        workers = [backend.spawn(WorkerHost, cfg, address, tokens) for _ in range(k)]
        backend.get([backend.call(w, "ready") for w in workers])
        start_round, cum_bytes = 0, 0
        if ckpt is not None:
            start_round, cum_bytes = _restore(backend, server, workers, ckpt)
        info = backend.get([backend.call(server, "info")])[0]
        info.update(
            address=address,
            workers=k,
            backend=backend.name,
            start_round=start_round,
            startup_seconds=round(time.perf_counter() - t0, 2),
        )
        log.info("run started: %s", info)
        if on_start:
            on_start(info)
        for r in range(start_round, cfg.fed.rounds):
            tr = time.perf_counter()
            opened = backend.get([backend.call(server, "open_round", r)])[0]
            if "stop" in opened:
                stopped = opened["stop"]
                log.warning("stopping before round %d: %s", r, stopped)
                break
            ids = opened["clients"]
            futures = [
                backend.call(w, "run_round", r, [c for c in ids if c % k == i])
                for i, w in enumerate(workers)
            ]
            results = [x for batch in backend.get(futures) for x in batch]
            record = backend.get([backend.call(server, "close_round")])[0]
            record.update(_client_stats(results))
            cum_bytes += record["bytes_up"] + record["bytes_down"]
            record["cum_bytes"] = cum_bytes
            record["bytes_fp32"] = record.pop("fp32_up") + 4 * info["trainable_params"] * len(ids)
            record.setdefault("accuracy", None)
            record.setdefault("loss", None)
            record.setdefault("epsilon", None)
            record["seconds"] = round(time.perf_counter() - tr, 3)
            writer.write(record)
            _checkpoint(backend, server, workers, out, r + 1, cum_bytes)
            if on_round:
                on_round(record)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: stopping Ray and gRPC, keeping metrics of finished rounds")
    finally:
        stop_all(backend, server)
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    extra: dict[str, Any] = {"interrupted": interrupted, "name": cfg.name}
    extra["stopped_reason"] = stopped
    extra["privacy"] = info_privacy(cfg)
    summary = summarize(records, wall_seconds=time.perf_counter() - t0, extra=extra)
    write_summary(out, summary)
    plot_report(records, out / "report.png")
    return summary


def info_privacy(cfg: RunConfig) -> dict[str, Any]:
    p = cfg.privacy
    return {"mechanism": p.mechanism, "target_epsilon": p.target_epsilon, "delta": p.delta}


def _checkpoint(
    backend: Any, server: Any, workers: list[Any], out: Path, next_round: int, cum_bytes: int
) -> None:
    server_state = backend.get([backend.call(server, "state_dict")])[0]
    clients: dict[int, Any] = {}
    for states in backend.get([backend.call(w, "state_dict") for w in workers]):
        clients.update(states)
    save_checkpoint(
        out,
        {
            "next_round": next_round,
            "cum_bytes": cum_bytes,
            "server": server_state,
            "clients": clients,
        },
    )


def _restore(
    backend: Any, server: Any, workers: list[Any], ckpt: dict[str, Any]
) -> tuple[int, int]:
    backend.get([backend.call(server, "load_state_dict", ckpt["server"])])
    k = len(workers)
    clients = ckpt["clients"]
    backend.get(
        [
            backend.call(
                w, "load_state_dict", {c: s for c, s in clients.items() if int(c) % k == i}
            )
            for i, w in enumerate(workers)
        ]
    )
    log.info("resumed at round %d", ckpt["next_round"])
    return int(ckpt["next_round"]), int(ckpt["cum_bytes"])


def _client_stats(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [x for x in results if x.get("ok")]
    numel = sum(x["numel"] for x in ok)
    return {
        "clients_failed": len(results) - len(ok),
        "mean_bits": (sum(x["mean_bits"] * x["numel"] for x in ok) / numel) if numel else None,
        "fp32_up": int(sum(x["fp32_bytes"] for x in ok)),
        "client_bytes_up": int(sum(x["wire_up"] for x in ok)),
        "client_bytes_down": int(sum(x["wire_down"] for x in ok)),
    }
