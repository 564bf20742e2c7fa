"""Transport: a packed payload's throughput through fedq's gRPC path vs a raw-bytes gRPC stream
(``--part throughput``), and seconds per round of a run deployed as processes vs simulated
(``--part rounds``, :mod:`fedq.bench.deploy_rounds`); ``--part all`` (the default) runs both.

fedq's path is what a model update takes: a ``WireMessage`` of 4-bit packed tensors is serialized
and chunked by ``TransportClient.push_update``, received by a real ``TransportServer``, reassembled
and fully validated by ``message_from_frames`` and handed to a handler; downloads go the other way
through ``GetTask``. The baseline, in the same run and the same server process, is a bare
generic-handler gRPC service streaming the same number of bytes in chunks of the same size with no
framing beyond gRPC's own. Server and client run in separate processes (spawned) so the GIL does
not couple them, with and without TLS (credentials from :mod:`fedq.transport.certs`). Goal: fedq's
path at >= 80% of the raw stream's throughput. Results: BENCHMARKS.md, "Transport" and
"Transport: seconds per round, serve + joins vs simulate".
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from fedq.bench import deploy_rounds
from fedq.bench.machine import machine_info

if TYPE_CHECKING:  # grpc, torch and the codec load when the bench runs, not when the CLI starts
    import grpc

    from fedq.codec import PackedTensor
    from fedq.transport import TlsConfig
    from fedq.wire import MessageKind, WireMessage

TARGET_RATIO = 0.8
BITS = 4
COLS = 2048
ROWS_PER_TENSOR = 4096  # 4 MiB of 4-bit payload per tensor
RAW_SERVICE = "fedqbench.Raw"
CLIENT_ID = "client-0"
MB = 1e6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--part",
        choices=("all", "throughput", "rounds"),
        default="all",
        help="throughput (payload over gRPC), rounds (serve + joins vs simulate) or all",
    )
    p.add_argument("--seed", type=int, default=0, help="payload seed; the rounds' scenario seed")
    g = p.add_argument_group("throughput")
    g.add_argument("--size-mib", type=int, default=64, help="packed payload size (MiB)")
    g.add_argument("--repeats", type=int, default=5, help="timed transfers per case (median kept)")
    g.add_argument("--chunk-kib", type=int, default=1024, help="chunk size of both paths (KiB)")
    g.add_argument("--tls", choices=("both", "on", "off"), default="both", help="TLS cases run")
    g.add_argument(
        "--direction",
        choices=("both", "upload", "download"),
        default="both",
        help="upload (PushUpdate), download (GetTask) or both",
    )
    deploy_rounds.add_arguments(p)


def payload_message(size_mib: int, seed: int, kind: MessageKind | None = None) -> WireMessage:
    """A message of ``kind`` (an update by default) whose tensors carry ``size_mib`` MiB of
    4-bit packed payload (seeded)."""
    import torch

    from fedq.codec import QuantSpec, quantize
    from fedq.wire import MessageKind, WireMessage

    gen = torch.Generator().manual_seed(seed)
    rows_left = size_mib * (1 << 20) * 8 // (BITS * COLS)
    tensors: dict[str, PackedTensor] = {}
    while rows_left > 0:
        rows = min(ROWS_PER_TENSOR, rows_left)
        x = torch.randn(rows, COLS, generator=gen)
        tensors[f"layer{len(tensors)}.weight"] = quantize(x, BITS, QuantSpec())
        rows_left -= rows
    return WireMessage(
        kind=kind or MessageKind.UPDATE, client_id=CLIENT_ID, round=1, tensors=tensors
    )


def _same_tensors(a: WireMessage, b: WireMessage) -> bool:
    """Same names, shapes, bit maps, scales, offsets and payload bytes."""
    import torch

    def same(x: PackedTensor, y: PackedTensor) -> bool:
        return (
            x.shape == y.shape
            and all(
                torch.equal(getattr(x, f), getattr(y, f)) for f in ("bits", "scales", "payload")
            )
            and (x.offsets is None) == (y.offsets is None)
            and (x.offsets is None or y.offsets is None or torch.equal(x.offsets, y.offsets))
        )

    return a.tensors.keys() == b.tensors.keys() and all(
        same(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@dataclass(frozen=True, slots=True)
class _ServerSpec:
    size_mib: int
    seed: int
    chunk_size: int
    tokens: dict[str, str] | str  # the tokens, or the server's tokens file to load them from
    tls: TlsConfig | None


class _Handler:
    """Serves the payload as every task; checks each update's size, keeps the last one."""

    def __init__(self, task: WireMessage) -> None:
        self.task = task
        self.expected = sum(p.payload_nbytes for p in task.tensors.values())
        self.updates = 0
        self.mismatched = 0
        self.last: WireMessage | None = None

    def get_task(self, client_id: str, round: int) -> WireMessage:
        return self.task

    def push_update(self, msg: WireMessage) -> None:
        self.updates += 1
        self.mismatched += sum(p.payload_nbytes for p in msg.tensors.values()) != self.expected
        self.last = msg


class _RawServicer:
    """Byte counts of a generic-handler service that moves opaque chunks (no protobuf)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.received: list[int] = []
        self.sent: list[int] = []

    def push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        n = 0
        for chunk in requests:
            n += len(chunk)
        self.received.append(n)
        return n.to_bytes(8, "little")

    def pull(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.sent.append(sum(len(c) for c in self.chunks))
        yield from self.chunks


def _serve(conn: Connection, spec: _ServerSpec) -> None:
    """Child process: a fedq TransportServer and the raw service, until told to stop."""
    from concurrent import futures

    import grpc
    import torch

    from fedq.transport import TransportServer, load_tokens
    from fedq.wire import MessageKind, WireLimits, bundle_to_bytes

    torch.set_num_threads(1)
    task = payload_message(spec.size_mib, spec.seed, kind=MessageKind.GLOBAL)
    handler = _Handler(task)
    limits = WireLimits(chunk_size=spec.chunk_size)
    tokens = load_tokens(spec.tokens) if isinstance(spec.tokens, str) else spec.tokens
    fedq_server = TransportServer(handler, limits=limits, tokens=tokens, tls=spec.tls)
    fedq_server.start()
    raw = _RawServicer(_chunks(bundle_to_bytes(task.tensors), spec.chunk_size))
    raw_server = grpc.server(futures.ThreadPoolExecutor(4))
    raw_server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                RAW_SERVICE,
                {
                    "Push": grpc.stream_unary_rpc_method_handler(raw.push),
                    "Pull": grpc.unary_stream_rpc_method_handler(raw.pull),
                },
            )
        ]
    )
    addr = "127.0.0.1:0"
    creds = spec.tls.server_credentials() if spec.tls else None
    raw_port = (
        raw_server.add_secure_port(addr, creds) if creds else raw_server.add_insecure_port(addr)
    )
    raw_server.start()
    conn.send((fedq_server.port, raw_port))
    try:
        while (command := conn.recv()) != "stop":
            assert command == "stats"
            same = handler.last is not None and _same_tensors(handler.last, task)
            handler.last = None
            conn.send(
                {
                    "fedq": fedq_server.counters.take(),
                    "updates": handler.updates,
                    "updates_wrong_size": handler.mismatched,
                    "last_update_equal": same,
                    "raw_received": raw.received,
                    "raw_sent": raw.sent,
                }
            )
            handler.updates = handler.mismatched = 0
            raw.received, raw.sent = [], []
    finally:
        raw_server.stop(0)
        fedq_server.stop(0)


def _median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """One untimed warm-up call of each, then ``repeats`` timed rounds alternating the order."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


class _Clients:
    """The client side of one TLS setting: fedq's TransportClient and the raw stubs, each direction
    measured as fedq vs raw in alternating order, with the bytes both ends counted."""

    def __init__(
        self,
        args: argparse.Namespace,
        msg: WireMessage,
        conn: Connection,
        ports: tuple[int, int],
        token: str,
        tls: TlsConfig | None,
    ) -> None:
        import grpc

        from fedq.transport import TransportClient
        from fedq.wire import WireLimits, bundle_to_bytes, message_to_frames

        self.args, self.msg, self.conn, self.tls = args, msg, conn, tls
        chunk = args.chunk_kib * 1024
        self.bundle_bytes = len(bundle_to_bytes(msg.tensors))
        self.raw_chunks = _chunks(bundle_to_bytes(msg.tensors), chunk)
        self.frame_bytes = sum(f.ByteSize() for f in message_to_frames(msg, chunk))
        self.client = TransportClient(
            f"127.0.0.1:{ports[0]}",
            client_id=CLIENT_ID,
            token=token,
            limits=WireLimits(chunk_size=chunk),
            tls=tls,
            timeout=600,
        )
        target = f"127.0.0.1:{ports[1]}"
        self.channel = (
            grpc.secure_channel(target, tls.channel_credentials())
            if tls
            else grpc.insecure_channel(target)
        )
        self.push = self.channel.stream_unary(f"/{RAW_SERVICE}/Push")
        self.pull = self.channel.unary_stream(f"/{RAW_SERVICE}/Pull")

    def close(self) -> None:
        self.client.close()
        self.channel.close()

    def _row(self, direction: str, times: dict[str, list[float]], **counts: Any) -> dict[str, Any]:
        fedq_s, raw_s = statistics.median(times["fedq"]), statistics.median(times["raw"])
        fedq_mbps, raw_mbps = self.bundle_bytes / fedq_s / MB, self.bundle_bytes / raw_s / MB
        return {
            "tls": self.tls is not None,
            "direction": direction,
            "calls": self.args.repeats + 1,
            "fedq_mbps": fedq_mbps,
            "raw_mbps": raw_mbps,
            "ratio": fedq_mbps / raw_mbps,
            "pass": fedq_mbps / raw_mbps >= TARGET_RATIO,
            "fedq_seconds": times["fedq"],
            "raw_seconds": times["raw"],
            "fedq_frame_bytes_per_call": self.frame_bytes,
            "raw_bytes_per_call": self.bundle_bytes,
            **counts,
        }

    def _server_stats(self) -> dict[str, Any]:
        self.conn.send("stats")
        stats: dict[str, Any] = self.conn.recv()
        return stats

    def upload(self) -> dict[str, Any]:
        sent: list[int] = []
        acked: list[int] = []

        def fedq() -> None:
            sent.append(self.client.push_update(self.msg))

        def raw() -> None:
            acked.append(int.from_bytes(self.push(iter(self.raw_chunks), timeout=600), "little"))

        times = _median_seconds({"fedq": fedq, "raw": raw}, self.args.repeats)
        stats = self._server_stats()
        fedq_bytes = {
            "client_sent": sum(sent),
            "server_received": stats["fedq"]["bytes_up"],
            "updates_decoded": stats["updates"],
            "updates_wrong_size": stats["updates_wrong_size"],
            "content_equal": stats["last_update_equal"],
        }
        raw_bytes = {
            "client_sent": len(acked) * self.bundle_bytes,
            "server_received": sum(stats["raw_received"]),
            "server_acked": sum(acked),
        }
        return self._row("upload", times, fedq_bytes=fedq_bytes, raw_bytes=raw_bytes)

    def download(self) -> dict[str, Any]:
        received: list[WireMessage] = []
        got: list[int] = []
        before = self.client.bytes_received

        def fedq() -> None:
            received[:] = [self.client.get_task(1)]

        def raw() -> None:
            got.append(sum(len(c) for c in self.pull(b"", timeout=600)))

        times = _median_seconds({"fedq": fedq, "raw": raw}, self.args.repeats)
        stats = self._server_stats()
        fedq_bytes = {
            "server_sent": stats["fedq"]["bytes_down"],
            "client_received": self.client.bytes_received - before,
            "content_equal": bool(received) and _same_tensors(received[0], self.msg),
        }
        raw_bytes = {"server_sent": sum(stats["raw_sent"]), "client_received": sum(got)}
        return self._row("download", times, fedq_bytes=fedq_bytes, raw_bytes=raw_bytes)


def _run_mode(
    args: argparse.Namespace, msg: WireMessage, tls_dir: str | None
) -> list[dict[str, Any]]:
    """Every direction for one TLS setting, against one spawned server process."""
    from fedq.transport import TlsConfig, read_token

    server_tls = client_tls = None
    token = "bench-token"
    tokens: dict[str, str] | str = {CLIENT_ID: token}
    if tls_dir is not None:
        from fedq.transport.certs import CredentialFiles

        files = CredentialFiles.under(tls_dir, [CLIENT_ID])
        server_tls = TlsConfig(str(files.server_cert), str(files.server_key))
        client_tls = TlsConfig(None, None, str(files.ca_cert))
        token, tokens = read_token(files.clients[CLIENT_ID].token), str(files.tokens)
    spec = _ServerSpec(args.size_mib, args.seed, args.chunk_kib * 1024, tokens, server_tls)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, spec), daemon=True)
    proc.start()
    try:
        if not conn.poll(300):
            raise RuntimeError("the bench server process did not start")
        clients = _Clients(args, msg, conn, conn.recv(), token, client_tls)
        try:
            clients.client.wait_ready(timeout=60)
            directions = ["upload", "download"] if args.direction == "both" else [args.direction]
            return [getattr(clients, d)() for d in directions]
        finally:
            clients.close()
    finally:
        if proc.is_alive():
            conn.send("stop")
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def _print_report(result: dict[str, Any]) -> None:
    m, cfg = result["machine"], result["config"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}")
    print(
        f"payload: {cfg['payload_bytes'] / (1 << 20):.1f} MiB bundle ({cfg['tensors']} tensors, "
        f"{BITS}-bit per-channel), {cfg['chunk_bytes'] // 1024} KiB chunks, "
        f"median of {cfg['repeats']} after a warm-up; server in its own process"
    )
    print()
    print(f"{'TLS':<5}{'direction':<11}{'fedq MB/s':>11}{'raw MB/s':>10}{'fedq/raw':>10}")
    for r in result["cases"]:
        print(
            f"{'on' if r['tls'] else 'off':<5}{r['direction']:<11}{r['fedq_mbps']:>11.0f}"
            f"{r['raw_mbps']:>10.0f}{r['ratio']:>10.2f}  {'PASS' if r['pass'] else 'FAIL'}"
        )
    print(f"(target: fedq >= {TARGET_RATIO:.0%} of the raw gRPC stream; MB = 10^6 bytes)")
    print(f"all targets: {'PASS' if result['all_pass'] else 'FAIL'}")


def _throughput(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fedq.transport.certs import make_credentials

    torch.set_num_threads(1)
    msg = payload_message(args.size_mib, args.seed)
    from fedq.wire import bundle_to_bytes

    payload_bytes = len(bundle_to_bytes(msg.tensors))
    cases: list[dict[str, Any]] = []
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.tls]
    with tempfile.TemporaryDirectory(prefix="fedq-bench-tls-") as tmp:
        make_credentials(tmp, [CLIENT_ID])
        for tls in modes:
            cases += _run_mode(args, msg, tmp if tls else None)
    return {
        "config": {
            "size_mib": args.size_mib,
            "payload_bytes": payload_bytes,
            "tensors": len(msg.tensors),
            "bits": BITS,
            "chunk_bytes": args.chunk_kib * 1024,
            "repeats": args.repeats,
            "seed": args.seed,
        },
        "target_ratio": TARGET_RATIO,
        "cases": cases,
        "all_pass": all(r["pass"] for r in cases),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fedq.transport.server import MAX_CHUNK_SIZE

    if args.size_mib < 1 or args.repeats < 1 or args.chunk_kib < 1:
        raise SystemExit("--size-mib, --repeats and --chunk-kib must be positive")
    if args.chunk_kib * 1024 > MAX_CHUNK_SIZE:
        raise SystemExit(f"--chunk-kib must be at most {MAX_CHUNK_SIZE // 1024}")
    deploy_rounds.check_args(args)
    result: dict[str, Any] = {"bench": "transport", "part": args.part, "machine": machine_info()}
    if args.part in ("all", "throughput"):
        result.update(_throughput(args))
        _print_report(result)
    if args.part in ("all", "rounds"):
        result["rounds"] = deploy_rounds.run(args)
    return result
