"""``fedq serve`` and ``fedq join``: the round protocol across machines, each site with its own
data.

:func:`serve` runs the server of a run on ``HOST:PORT`` (TLS outside loopback, per-client tokens):
the same :class:`~fedq.runtime.hosts.ServerHost` a simulation runs, writing the same run folder
(config.json, metrics.jsonl, summary.json, report.png, checkpoint.pt) as it goes; its first
checkpoint (next round 0) is written before it listens, so ``--resume`` works from the start.
Its roster is the client ids of its tokens file. The server never sees client data: weights and
sampling rates come from what each client reports it holds, and it evaluates on its own
evaluation data.

:func:`join` is one site: it loads its own data, registers as its client id, and pulls its work
until the server says the run is over, reconnecting (with backoff) if the server restarts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from fedq.config import RunConfig
from fedq.data.datasets import Shard
from fedq.data.scaling import scale_warning
from fedq.errors import FOR_USER, ConfigError
from fedq.rounds.node import Backoff, ClientNode
from fedq.runtime.checkpoint import load_checkpoint
from fedq.runtime.hosts import ServerHost, make_runner, run_config
from fedq.runtime.preflight import check_names
from fedq.runtime.recorder import RoundLog, RunRecorder
from fedq.runtime.setup import preload_optimizers, torch_device
from fedq.runtime.sitedata import check_site_data, load_site_data
from fedq.transport.keepalive import Keepalive
from fedq.transport.security import TlsConfig, check_bind_policy
from fedq.wire.control import ClientInfo, Joined

log = logging.getLogger(__name__)

Events = Callable[[str, dict[str, Any]], None]
#: How long ``fedq serve`` keeps answering after the run ended for sites that may still ask: above
#: the longest wait between two reconnection attempts of a site (Backoff.cap).
LINGER_S = 30.0


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"address {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def serve(
    cfg: RunConfig,
    *,
    listen: str,
    tokens: Mapping[str, str],
    out: Path,
    tls: TlsConfig | None = None,
    allow_insecure: bool = False,
    resume: bool = False,
    eval_data: str | None = None,
    on_event: Events | None = None,
    keepalive: Keepalive | None = None,
    linger_s: float = LINGER_S,
) -> dict[str, Any]:
    """Serve one run until it ends (or Ctrl-C); returns its summary. After the end it keeps
    answering for up to ``linger_s`` seconds, until every site that may still ask was told
    (:func:`_drain`)."""
    check_names(cfg)
    roster = list(tokens)
    if len(roster) != cfg.rounds.num_clients:
        raise ConfigError(
            f"rounds.num_clients: the tokens file lists {len(roster)} clients but the scenario has "
            f"rounds.num_clients={cfg.rounds.num_clients}; pass --set "
            f"rounds.num_clients={len(roster)}"
        )
    host, port = parse_address(listen)
    # before the run folder exists: a refused start leaves nothing behind
    check_bind_policy(
        host, tls, allow_insecure, fix="pass --cert FILE and --key FILE (TLS), or --insecure"
    )
    ckpt = load_checkpoint(out) if resume else None
    start_round = int(ckpt["next_round"]) if ckpt is not None else 0
    wall = float(ckpt.get("wall_seconds", 0.0)) if ckpt is not None else 0.0
    recorder = RunRecorder(
        out,
        cfg,
        resume_round=start_round if ckpt is not None else None,
        last_round=ckpt and ckpt.get("log"),
        wall_before=wall,
    )

    def checkpoint(next_round: int) -> None:  # called from the server's engine, once it runs
        recorder.checkpoint(
            {
                "next_round": next_round,
                "server": server.state_dict(),
                "clients": {},
                "client_traffic": server.client_traffic,
            }
        )

    def round_done(rec: dict[str, Any]) -> None:
        if on_event is not None:
            on_event("round", rec)

    hooks = RoundLog(recorder, checkpoint, round_done)
    server = ServerHost(
        cfg,
        roster,
        tokens=tokens,
        host=host,
        port=port,
        tls=tls,
        allow_insecure=allow_insecure,
        eval_data=eval_data,
        hooks=hooks,
        keepalive=keepalive,
        run_id=None if ckpt is None else str(ckpt["server"]["run_id"]),
    )
    if ckpt is not None:  # each client's bytes in the rounds before the restart
        server.client_traffic = {
            str(c): {k: int(v) for k, v in row.items()}
            for c, row in ckpt.get("client_traffic", {}).items()
        }
        server.load_state_dict(ckpt["server"], ckpt["ledger_journal"])
    else:  # resumable from the start: round 0 with this run id, roster and initial model
        recorder.checkpoint(
            {"next_round": 0, "server": server.state_dict(), "clients": {}, "client_traffic": {}}
        )
    recorder.trainable_params = int(server.workload.info()["trainable_params"])
    address = server.start()
    if on_event is not None:
        on_event(
            "listening",
            {
                "address": address,
                "run_id": server.engine.run_id,
                "tls": tls is not None,
                "clients": len(roster),
                "start_round": start_round,
            },
        )
    interrupted = False
    seen: set[str] = set()
    try:
        server.begin(start_round)
        while not hooks.done.wait(0.5):
            members = server.engine.available()
            new = {m.client_id for m in members} - seen
            if new and on_event is not None:
                on_event(
                    "clients", {"available": [m.client_id for m in members], "new": sorted(new)}
                )
            seen |= new
        _drain(server, linger_s, on_event)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: keeping the rounds finished so far")
    finally:
        server.stop("the server was stopped" if interrupted else "the run is over")
    stopped = "interrupted" if hooks.outcome is None else hooks.outcome.stopped_reason
    extra = {
        "interrupted": interrupted,
        "name": cfg.name,
        "mode": cfg.mode,
        "stopped_reason": stopped,
        "run_id": server.engine.run_id,
        "clients": server.client_traffic,
    }
    return recorder.finish(extra, server.report_extras())


def _drain(server: ServerHost, linger_s: float, on_event: Events | None) -> None:
    """Keep answering after the run ended until every registered site was told so (DONE on its
    work stream, also after it registers again) or ``linger_s`` passed: a site that was
    reconnecting when the run ended hears that it ended, and exits 0. A site gone for good
    costs the wait."""
    start = time.monotonic()
    said = on_event is None
    while (left := start + linger_s - time.monotonic()) > 0 and (untold := server.engine.untold()):
        if not said and left < linger_s - 1.0:  # the sites still following hear DONE in 1 s
            on_event("linger", {"clients": untold, "seconds": round(left)})  # type: ignore[misc]
            said = True
        time.sleep(0.1)


def join(
    conn: Any,
    client_id: str,
    data_source: str,
    *,
    backoff: Backoff | None = None,
    on_event: Events | None = None,
    device: Literal["cpu", "cuda", "auto"] | None = None,
    model_path: str | None = None,
) -> dict[str, Any]:
    """Take part in the server's run as ``client_id`` with the data of ``data_source``; returns
    when the run is over (the reason, tasks done, and the bytes this client counted). ``device``
    (cpu, cuda, auto) is where this site trains; by default the run's ``runtime.device``.
    ``model_path``: this site's own copy of the base model (a Hugging Face directory), which
    must have the fingerprint the server sends (``model.base_sha256``)."""
    if device is not None:
        torch_device(device)  # a site without the GPU it asks for fails before joining
    data = load_site_data(data_source)
    shard = Shard.whole(data)
    if shard.size < 1:
        raise ConfigError(f"--data {data_source!r} holds no examples")
    preload_optimizers()
    warned = False

    def runner(joined: Joined) -> Any:
        nonlocal warned
        cfg = run_config(joined)
        if model_path is not None:
            model = dataclasses.replace(cfg.model, name=f"hf:{model_path}")
            cfg = dataclasses.replace(cfg, model=model)
            joined = dataclasses.replace(joined, config_json=json.dumps(cfg.to_dict()))
        check_site_data(data, joined)
        warning = None if cfg.data.standardize else scale_warning(data, f"--data {data_source}")
        if warning and not warned:
            log.warning(warning, extra=FOR_USER)
            warned = True
        if device is not None:
            cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, device=device))
        return make_runner(cfg, {client_id: shard}, joined)

    node = ClientNode(
        conn,
        [ClientInfo(client_id, shard.size)],
        runner,
        node=socket.gethostname(),
        backoff=backoff,
        on_event=on_event,
    )
    try:
        reason = node.run()
    except KeyboardInterrupt:
        node.stop()
        reason = "interrupted"
    mine = conn.counters.snapshot()["clients"].get(client_id, {})
    return {
        "reason": reason,
        **node.stats,
        "examples": shard.size,
        "bytes_up": int(mine.get("bytes_up", 0)),
        "bytes_down": int(mine.get("bytes_down", 0)),
    }
