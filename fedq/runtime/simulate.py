"""``fedq simulate``: a whole federated run on one machine, every tensor over real gRPC.

The driver only orchestrates: it opens a round on the server host, fans the selected logical
clients out to the worker hosts (client ``c`` always runs on worker ``c % K``, so its state stays
put), closes the round, and writes one metrics record per round as it goes (Ctrl-C keeps them).
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
from fedq.runtime.backend import make_backend
from fedq.runtime.hosts import ServerHost, WorkerHost

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]


def num_workers(cfg: RunConfig) -> int:
    k = cfg.runtime.workers or os.cpu_count() or 1
    return max(1, min(k, cfg.fed.num_clients))


def simulate(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_round: RoundCallback | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` and write config.json, metrics.jsonl, summary.json and report.png to out_dir."""
    from fedq.report import MetricsWriter, plot_report, summarize, write_config, write_summary

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg.to_dict())
    writer = MetricsWriter(out)
    t0 = time.perf_counter()
    tokens = {client_name(i): secrets.token_urlsafe(24) for i in range(cfg.fed.num_clients)}
    backend = make_backend(cfg.runtime)
    interrupted = False
    error: str | None = None
    server: Any = None
    try:
        server = backend.spawn(ServerHost, cfg, tokens)
        address = backend.get([backend.call(server, "start")])[0]
        k = num_workers(cfg)
        workers = [backend.spawn(WorkerHost, cfg, address, tokens) for _ in range(k)]
        backend.get([backend.call(w, "ready") for w in workers])
        info = backend.get([backend.call(server, "info")])[0]
        info.update(address=address, workers=k, backend=backend.name,
                    startup_seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
        log.info("run started: %s", info)
        if on_start:
            on_start(info)
        cum_bytes = 0
        for r in range(cfg.fed.rounds):
            tr = time.perf_counter()
            ids = backend.get([backend.call(server, "open_round", r)])[0]
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
            record["epsilon"] = None
            record["seconds"] = round(time.perf_counter() - tr, 3)
            writer.write(record)
            if on_round:
                on_round(record)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: stopping Ray and gRPC, keeping partial metrics")
    finally:
        if server is not None:
            try:
                backend.get([backend.call(server, "stop")])
            except Exception as e:  # shutting down anyway; report but do not mask the cause
                log.warning("server stop failed: %s", e)
        backend.shutdown()
    summary = summarize(writer.records, wall_seconds=time.perf_counter() - t0,
                        extra={"interrupted": interrupted, "name": cfg.name})  # fmt: skip
    if error:
        summary["error"] = error
    write_summary(out, summary)
    plot_report(writer.records, out / "report.png")
    return summary


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
