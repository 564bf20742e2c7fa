"""The ``fedq`` command line. Library code logs; only this module writes to the console."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedq.bench import BENCHES
from fedq.errors import ConfigError, FedqError

if TYPE_CHECKING:
    from fedq.config import RunConfig


def _bench(args: argparse.Namespace) -> int:
    mod = importlib.import_module(f"fedq.bench.{args.bench}")
    result = mod.run(args)
    if getattr(args, "json", None):
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _load(args: argparse.Namespace) -> RunConfig:
    from fedq.config import load_scenario

    overrides = list(args.set or [])
    if getattr(args, "ray_address", None):
        overrides.append(f"runtime.ray_address={args.ray_address}")
    return load_scenario(args.scenario, overrides)


def _describe(cfg: RunConfig) -> str:
    """One line saying what will run: the numbers a user checks before waiting for a run."""
    head = (
        f"{cfg.name} | {cfg.rounds.num_clients} clients, {cfg.rounds.clients_per_round}/round, "
        f"{cfg.rounds.count} rounds | data {cfg.data.name} ({cfg.data.partition}) | "
        f"model {cfg.model.name}"
    )
    from fedq.modes import get_mode

    return head + get_mode(cfg.mode).describe(cfg)


def _simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    _resume_args(args, "simulate")
    cfg = _load(args)  # a scenario's problems come before the heavy imports (torch, Ray)
    from fedq.runtime.simulate import simulate

    out = Path(
        args.resume or args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    print(f"fedq simulate: {_describe(cfg)} | out {out}")
    bar = tqdm(total=cfg.rounds.count, unit="round", disable=args.quiet, dynamic_ncols=True)

    def on_start(info: dict[str, Any]) -> None:
        bar.write(
            (f"resuming at round {info['start_round']}; " if info["start_round"] else "")
            + f"started in {info['startup_seconds']} s on {info['backend']} with "
            f"{info['workers']} workers; {info['trainable_params']:,} trainable params "
            f"({_fmt_bytes(4 * info['trainable_params'])} as fp32 per client per direction)"
        )
        for line in _placement_lines(info.get("placement") or {}):
            bar.write(line)
        priv = info.get("privacy", {})
        if priv.get("mechanism", "none") != "none":
            shown = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in priv.items()
                if v is not None
            )
            bar.write(f"privacy: {shown}")
        bar.update(info["start_round"])

    def on_round(rec: dict[str, Any]) -> None:
        acc, site = rec.get("accuracy"), rec.get("site_accuracy")
        bar.set_postfix_str(
            (f"acc {acc:.3f} " if acc is not None else "")
            + (f"sites {site:.3f} " if site is not None else "")
            + f"wire {_fmt_bytes(rec['cum_bytes'])} bits {rec.get('mean_bits') or 0:.1f}"
        )
        bar.update(1)

    summary = simulate(cfg, out, resume=bool(args.resume), on_start=on_start, on_round=on_round)
    bar.close()
    return _print_summary(summary, out)


def _placement_lines(pl: dict[str, Any], most: int = 4) -> list[str]:
    """Which node runs the server (and where it listens) and, one line per node, its workers
    with their clients (summary.json has every worker)."""
    if not pl:
        return []

    def node(w: dict[str, Any]) -> str:
        return f"on {w['node_ip']} ({w['hostname']})" if w.get("node_ip") else "in this process"

    srv = pl["server"]
    lines = [
        f"server {node(srv)}, listening on {pl['address']} ({'TLS' if pl['tls'] else 'plaintext'})"
    ]
    by_node: dict[str, list[str]] = {}
    for name, w in pl["workers"].items():
        by_node.setdefault(node(w), []).append(f"{name} clients {w['clients']}")
    for where, ws in by_node.items():
        more = f"; and {len(ws) - most} more" if len(ws) > most else ""
        lines.append(f"workers {where}: {'; '.join(ws[:most])}{more}")
    return lines


#: Exit status of a run that ended without applying any round (README, "Outputs").
EXIT_NO_ROUND_APPLIED = 3


def _print_summary(summary: dict[str, Any], out: Path) -> int:
    """The end line of a run (simulate and serve alike); returns the exit status: 130 when
    interrupted, 3 when no round was applied, else 0."""
    acc = summary.get("final_accuracy")
    ppl = summary.get("final_perplexity")
    n, applied = summary.get("rounds_completed", 0), summary.get("rounds_applied", 0)
    discarded = summary.get("rounds_discarded", 0)
    metric = (
        f"perplexity {ppl:.3f}"
        if ppl is not None and acc is None
        else f"accuracy {acc if acc is None else f'{acc:.4f}'}"
    )
    site_acc, site_ppl = summary.get("last_site_accuracy"), summary.get("last_site_perplexity")
    if site_acc is not None or site_ppl is not None:  # data.site_holdout
        metric += (
            f" (sites' own rows: accuracy {site_acc:.4f})"
            if site_acc is not None
            else f" (sites' own rows: perplexity {site_ppl:.3f})"
        )
    print(
        f"done: {metric} | "
        + f"{n} round{'' if n == 1 else 's'}, {applied} applied"
        + (f" ({discarded} discarded)" if discarded else "")
        + " | "
        + (f"epsilon {summary['epsilon_spent']:.4g} | " if summary.get("epsilon_spent") else "")
        + "wire "
        f"{_fmt_bytes(summary.get('bytes_wire_total') or 0)} | "
        f"{summary.get('compression_ratio') or 0:.2f}x "
        f"smaller than fp32 | {summary.get('wall_seconds', 0):.1f} s | results in {out}"
    )
    failed = not applied and not summary.get("interrupted")
    if summary.get("stopped_reason"):  # a failed run's begins "no round was applied"
        print(("" if failed else "stopped early: ") + summary["stopped_reason"])
    if summary.get("interrupted"):
        return 130
    return EXIT_NO_ROUND_APPLIED if failed else 0


def _export(args: argparse.Namespace) -> int:
    from fedq.runtime.export import export_run

    out = export_run(args.run, args.out, merge=args.merge)
    what = "merged model (transformers)" if args.merge else "adapter (PEFT)"
    print(f"wrote {what} to {out}")
    return 0


def _quantize_base(args: argparse.Namespace) -> int:
    from fedq.runtime.export import quantize_base

    done = quantize_base(
        args.model,
        args.out,
        bits=args.bits,
        budget_mb=args.budget_mb,
        group_size=args.group_size,
    )
    widths = ", ".join(f"{n} at {b} bits" for b, n in done["widths"].items())
    print(
        f"wrote {done['out']}: {done['layers']} linear layers packed ({widths}), "
        f"{_fmt_bytes(done['packed_bytes'])}; base SHA-256 {done['sha256']}, made from "
        f"{done['source']} (SHA-256 {done['source_sha256']}); use it as model.name: "
        f"hf:{done['out']}"
    )
    return 0


def _resume_args(args: argparse.Namespace, command: str) -> None:
    """``--resume DIR``: the scenario is DIR/config.json unless given, and DIR is the output."""
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("--resume DIR writes into DIR; do not also pass a different --out")
        args.scenario = args.scenario or str(Path(args.resume) / "config.json")
    if not args.scenario:
        raise ConfigError(f"{command} needs a SCENARIO file (or --resume DIR)")


def _site_part(rec: dict[str, Any]) -> str:
    """The sites' own evaluation (``data.site_holdout``), pooled, when the round has one."""
    sites = rec.get("site_eval") or {}
    if not sites:
        return ""
    acc, ppl = rec.get("site_accuracy"), rec.get("site_perplexity")
    what = f"accuracy {acc:.4f}" if acc is not None else f"perplexity {ppl:.3f}"
    return f", sites' own rows ({len(sites)}): {what}"


def _round_line(rec: dict[str, Any]) -> str:
    acc, eps, ppl = rec.get("accuracy"), rec.get("epsilon"), rec.get("perplexity")
    dropped = rec.get("dropped") or {}
    return (
        f"round {rec['round']}: {rec['clients_ok']}/{rec['clients_selected']} updates"
        + ("" if rec.get("applied", True) else " (discarded: too few)")
        + (f", accuracy {acc:.4f}" if acc is not None else "")
        + (f", perplexity {ppl:.3f}" if ppl is not None else "")
        + _site_part(rec)
        + (f", epsilon {eps:.4g}" if eps else "")
        + f", wire {_fmt_bytes(rec['bytes_up'] + rec['bytes_down'])}"
        + f", {rec['seconds']:.1f} s"
        + "".join(f"\n  dropped {c}: {why}" for c, why in dropped.items())
    )


def _serve(args: argparse.Namespace) -> int:
    _resume_args(args, "serve")
    cfg = _load(args)  # a scenario's problems come before the heavy imports (torch, grpc)
    from fedq.runtime.deploy import LINGER_S, serve
    from fedq.transport.keepalive import DEFAULT_MIN_PING_S, Keepalive
    from fedq.transport.security import TlsConfig
    from fedq.transport.tokens import load_tokens

    if bool(args.cert) != bool(args.key):
        raise ConfigError("serve: give both --cert and --key (the server's TLS identity)")
    if args.client_ca and not args.cert:
        raise ConfigError("serve: --client-ca (mutual TLS) needs --cert and --key")
    tls = None
    if args.cert:
        tls = TlsConfig(
            args.cert, args.key, ca_file=args.client_ca, require_client_cert=bool(args.client_ca)
        )
    tokens = load_tokens(args.tokens)
    out = Path(
        args.resume or args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    print(f"fedq serve: {_describe(cfg)} | out {out}")

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "listening":
            how = "plaintext" if tls is None else ("mutual TLS" if args.client_ca else "TLS")
            print(
                f"listening on {info['address']} ({how}), run {info['run_id']}, "
                f"{info['clients']} clients known"
                + (f"; resuming at round {info['start_round']}" if info["start_round"] else ""),
                flush=True,
            )
        elif kind == "clients":
            print(
                f"clients available ({len(info['available'])}): {', '.join(info['available'])}",
                flush=True,
            )
        elif kind == "round":
            print(_round_line(info), flush=True)
        elif kind == "linger":
            print(
                f"the run is over; waiting up to {info['seconds']:g} s for "
                f"{', '.join(info['clients'])} to hear it (--linger-s)",
                flush=True,
            )

    min_ping = DEFAULT_MIN_PING_S if args.min_ping_s is None else args.min_ping_s
    summary = serve(
        cfg,
        listen=args.listen,
        tokens=tokens,
        out=out,
        tls=tls,
        allow_insecure=args.insecure,
        resume=bool(args.resume),
        eval_data=args.eval_data,
        on_event=on_event,
        keepalive=Keepalive(min_ping_s=min_ping),
        linger_s=LINGER_S if args.linger_s is None else args.linger_s,
    )
    for cid, row in sorted(summary.get("clients", {}).items()):
        print(f"  {cid}: up {row['bytes_up']} B, down {row['bytes_down']} B")
    return _print_summary(summary, out)


def _join(args: argparse.Namespace) -> int:
    from fedq.rounds.node import Backoff
    from fedq.runtime.deploy import join, parse_address
    from fedq.transport.client import TransportClient
    from fedq.transport.keepalive import DEFAULT_PING_S, Keepalive
    from fedq.transport.security import TlsConfig, is_loopback
    from fedq.transport.tokens import read_token

    host, _ = parse_address(args.server)
    if bool(args.cert) != bool(args.key):
        raise ConfigError("join: give both --cert and --key (this client's TLS identity)")
    tls = None
    if args.ca or args.cert or not (args.insecure or is_loopback(host)):
        # outside loopback TLS is on; without --ca the system's trusted roots verify the server
        tls = TlsConfig(args.cert, args.key, ca_file=args.ca, server_name=args.server_name)
    token = read_token(args.token_file)

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "joined":
            print(
                f"joined run {info['run_id']} on {args.server} as {args.client_id}"
                + (" (TLS)" if tls is not None else " (plaintext)"),
                flush=True,
            )
        elif kind == "task":
            print(
                f"round {info['round']}: done in {info['seconds']:.1f} s"
                + (f", loss {info['loss']:.4f}" if info.get("loss") is not None else ""),
                flush=True,
            )
        elif kind == "failed":
            print(f"round {info['round']}: failed: {info['error']}", flush=True)
        elif kind in ("retry", "reconnect"):
            print(f"server unreachable ({info['error']}); reconnecting", flush=True)

    backoff = Backoff(give_up_after=args.give_up_after)
    keepalive = Keepalive(ping_s=DEFAULT_PING_S if args.keepalive_s is None else args.keepalive_s)
    with TransportClient(
        args.server,
        client_id=args.client_id,
        token=token,
        tls=tls,
        timeout=args.timeout,
        keepalive=keepalive,
    ) as conn:
        result = join(
            conn,
            args.client_id,
            args.data,
            backoff=backoff,
            on_event=on_event,
            device=args.device,
            model_path=args.model,
        )
    print(
        f"done: {result['reason']} | {result['tasks']} rounds ({result['failed']} failed) | "
        f"{result['examples']} examples | up {result['bytes_up']} B, down "
        f"{result['bytes_down']} B"
    )
    return 130 if result["reason"] == "interrupted" else 0


def _shard(args: argparse.Namespace) -> int:
    from fedq.runtime.shard import write_shards

    cfg = _load(args)
    paths = write_shards(cfg, Path(args.out))
    print(
        f"fedq shard: {len(paths)} client files of {cfg.data.name} ({cfg.data.partition}) in "
        f"{args.out}: {paths[0].name} .. {paths[-1].name}"
    )
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedq.runtime.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.sweep)
    out = Path(args.out or Path("runs") / f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(
        f"fedq sweep: {sweep.name} | {len(sweep.runs)} runs over {', '.join(sweep.axes)} | "
        f"{sweep.parallel} in parallel | out {out}"
    )

    def on_done(row: dict[str, Any]) -> None:
        acc, eps = row.get("final_accuracy"), row.get("epsilon_spent")
        print(
            f"  done {row['label']}: accuracy {acc if acc is None else f'{acc:.4f}'}, "
            f"wire {_fmt_bytes(row.get('bytes_wire_total') or 0)}, epsilon {eps}"
        )

    run_sweep(sweep, out, on_done=on_done)
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'} and {out / 'sweep.png'}")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedq.transport.certs import (
        DEFAULT_DAYS,
        DEFAULT_HOSTS,
        default_client_ids,
        make_credentials,
    )

    if args.client_ids:
        ids = [c.strip() for c in args.client_ids.split(",")]
        if args.clients is not None and args.clients != len(ids):
            raise ConfigError(
                f"certs: --clients {args.clients} but --client-ids lists {len(ids)} ids"
            )
    elif args.clients is not None:
        ids = default_client_ids(args.clients)
    else:
        raise ConfigError("certs: say how many clients (--clients N) or which (--client-ids)")
    days = DEFAULT_DAYS if args.days is None else args.days
    issued = make_credentials(
        args.dir, ids, args.host or DEFAULT_HOSTS, days=days, force=args.force
    )
    f = issued.files
    for path in issued.removed:
        print(f"removed stale {path}")
    print(f"fedq certs: wrote credentials for {len(ids)} clients to {f.root}")
    print(f"  CA:      {f.ca_cert}, {f.ca_key}")
    print(f"  server:  {f.server_cert}, {f.server_key} (hosts: {', '.join(issued.hosts)})")
    print(f"  tokens:  {f.tokens} (server side: every client id and its token)")
    print(f"  clients: {f.root / 'clients'}/<id>.pem, .key, .token for {', '.join(ids)}")
    print(f"  valid until {issued.not_after:%Y-%m-%d %H:%M} UTC; keys and tokens are mode 0600")
    print("warning: this is a development CA (its key is not protected), not for production")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedq", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="run a simulated multi-client federated run (local Ray)")
    s.add_argument("scenario", nargs="?", help="scenario YAML file, e.g. scenarios/quickstart.yaml")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key")
    s.add_argument("--out", metavar="DIR", help="output folder (default runs/<name>-<time>)")
    s.add_argument("--ray-address", metavar="ADDR", help="attach to an existing Ray cluster")
    s.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint"
    )
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_simulate)

    v = sub.add_parser("serve", help="serve a run to clients on other machines (fedq join)")
    v.add_argument("scenario", nargs="?", help="scenario YAML file (or --resume DIR)")
    v.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on")
    v.add_argument(
        "--tokens",
        required=True,
        metavar="FILE",
        help="YAML mapping client id -> token (fedq certs writes one)",
    )
    v.add_argument("--cert", metavar="FILE", help="server certificate (PEM): TLS on")
    v.add_argument("--key", metavar="FILE", help="server private key (PEM)")
    v.add_argument(
        "--client-ca", metavar="FILE", help="CA that signs client certificates: mutual TLS"
    )
    v.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback address (trusted networks only)",
    )
    v.add_argument(
        "--eval-data",
        metavar="SOURCE",
        help="evaluation data (default: the scenario's data set's test split)",
    )
    v.add_argument(
        "--min-ping-s",
        type=float,
        metavar="S",
        help="accept a site's keepalive ping every S seconds or more (default 10; "
        "fedq join --keepalive-s must not be below it)",
    )
    v.add_argument(
        "--linger-s",
        type=float,
        metavar="S",
        help="after the run ends, keep answering sites that are reconnecting for up "
        "to S seconds so that they hear it ended (default 30)",
    )
    v.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key")
    v.add_argument("--out", metavar="DIR", help="output folder (default runs/<name>-<time>)")
    v.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    v.set_defaults(func=_serve)

    j = sub.add_parser("join", help="take part in a served run as one client, with its own data")
    j.add_argument("--server", required=True, metavar="HOST:PORT")
    j.add_argument("--client-id", required=True, metavar="ID")
    j.add_argument("--token-file", required=True, metavar="FILE", help="this client's token")
    j.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="this site's data: csv:PATH, npz:PATH, jsonl:PATH, py:module:fn or a built-in",
    )
    j.add_argument(
        "--model",
        metavar="PATH",
        help="this site's own copy of the base model (a Hugging Face directory); it must be the "
        "one the server trains on (checked by fingerprint before any round)",
    )
    j.add_argument("--ca", metavar="FILE", help="CA that signed the server's certificate")
    j.add_argument("--cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    j.add_argument("--key", metavar="FILE", help="client private key (PEM) for mutual TLS")
    j.add_argument(
        "--server-name",
        metavar="NAME",
        help="name expected in the server certificate (default: the host)",
    )
    j.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext to a non-loopback server (trusted networks only)",
    )
    j.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="deadline of one call (download, upload)",
    )
    j.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        help="where this site trains (default: the run's runtime.device)",
    )
    j.add_argument(
        "--keepalive-s",
        type=float,
        metavar="S",
        help="ping the server every S seconds, to keep an idle connection open and "
        "notice a vanished server (default 20; not below its --min-ping-s)",
    )
    j.add_argument(
        "--give-up-after",
        type=float,
        default=600.0,
        metavar="S",
        help="stop reconnecting after this long without the server",
    )
    j.set_defaults(func=_join)

    h = sub.add_parser("shard", help="write each client's share of a scenario's data to a file")
    h.add_argument("scenario", help="scenario YAML file")
    h.add_argument("--out", required=True, metavar="DIR", help="folder for <client id>.npz/.csv")
    h.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key")
    h.set_defaults(func=_shard)

    x = sub.add_parser(
        "export", help="write a run's final LoRA adapter (PEFT format) or merged model"
    )
    x.add_argument("run", metavar="RUN", help="a run folder (config.json + checkpoint.pt)")
    x.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    x.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter into the base and write a plain transformers model",
    )
    x.set_defaults(func=_export)

    q = sub.add_parser(
        "quantize-base", help="pack a causal LM's frozen base once, for sites to load packed"
    )
    q.add_argument("model", metavar="MODEL", help="hf:PATH or a packaged model (smollm2_instruct)")
    q.add_argument("--out", required=True, metavar="DIR", help="folder to write (a model dir)")
    width = q.add_mutually_exclusive_group(required=True)
    width.add_argument("--bits", type=int, help="every linear layer at this width (2..8)")
    width.add_argument(
        "--budget-mb",
        type=float,
        metavar="MIB",
        help="fit the packed layers in this many MiB, each at the width of least error",
    )
    q.add_argument(
        "--group-size", type=int, default=64, help="values per scale and offset (with --bits)"
    )
    q.set_defaults(func=_quantize_base)

    w = sub.add_parser("sweep", help="run a grid of scenarios (e.g. epsilon x bit policy)")
    w.add_argument("sweep", help="sweep YAML file, e.g. scenarios/privacy_sweep.yaml")
    w.add_argument("--out", metavar="DIR", help="output folder (default runs/<name>-<time>)")
    w.set_defaults(func=_sweep)

    c = sub.add_parser(
        "certs", help="make a development CA, server and client certificates, and client tokens"
    )
    c.add_argument("dir", metavar="DIR", help="output folder (must be empty unless --force)")
    c.add_argument("--clients", type=int, metavar="N", help="clients client-0 .. client-{N-1}")
    c.add_argument("--client-ids", metavar="A,B,C", help="comma-separated client ids instead")
    c.add_argument(
        "--host",
        action="append",
        metavar="NAME_OR_IP",
        help="a name or IP clients dial, for the server certificate (repeatable; "
        "default: localhost and 127.0.0.1)",
    )
    c.add_argument("--days", type=int, help="validity in days (default 365)")
    c.add_argument("--force", action="store_true", help="replace credentials already in DIR")
    c.set_defaults(func=_certs)

    b = sub.add_parser("bench", help="run a benchmark and print ratios against a same-run baseline")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name in BENCHES:
        try:
            mod = importlib.import_module(f"fedq.bench.{name}")
        except ModuleNotFoundError:
            continue
        bp = bsub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0])
        bp.add_argument("--json", metavar="PATH", help="also write the results as JSON")
        mod.add_arguments(bp)
        bp.set_defaults(func=_bench)
    return p


class _ConsoleFormat(logging.Formatter):
    """Log lines as usual, but a warning meant for the user (``extra=FOR_USER``) as one plain
    ``fedq: warning: ...`` line, like the CLI's errors."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "fedq_for_user", False):
            return f"fedq: warning: {record.getMessage()}"
        return super().format(record)


def _quiet_grpc(verbose: bool) -> None:
    """gRPC's C core writes its own log lines to stderr (keepalive, GOAWAY, "All log messages
    before absl::InitializeLog()"); fedq says what matters in its own words. They show with -v,
    or when the user set GRPC_VERBOSITY / GRPC_TRACE. Runs before anything imports grpc."""
    if not verbose:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        os.environ.setdefault("GRPC_TRACE", "")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _quiet_grpc(args.verbose)
    # transformers 5.x deprecation noise from inside PEFT; not actionable for fedq users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    handler = logging.StreamHandler()
    handler.setFormatter(_ConsoleFormat("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[handler]
    )
    try:
        code = args.func(args)
    except FedqError as e:
        print(f"fedq: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
