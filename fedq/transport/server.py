"""gRPC server for fedq: the ``Rounds`` and ``Split`` services plus standard gRPC health.

The server is a thin shell around a plain handler object (the round engine), so the same handler
runs in-process in tests. Callers authenticate as a *principal* (a client id, or a simulation
worker hosting several logical clients, ``hosts``); every message names the logical client it is
for, which must be one the principal hosts. Failures travel as status codes with a reason, never
as exceptions: malformed input is INVALID_ARGUMENT, a handler's :class:`~fedq.errors.FedqError`
FAILED_PRECONDITION (ALREADY_EXISTS when a client id is held by another open work stream), a bad
token UNAUTHENTICATED, a client the principal does not host
PERMISSION_DENIED, anything else INTERNAL (logged); each ends one RPC only, and the server keeps
serving. A call on a retired service path (``fedq.v1.Federated``, ``fedq.v1.Split``: round
protocol 2) is FAILED_PRECONDITION naming both protocol versions, so an old client says what to
upgrade instead of gRPC's bare UNIMPLEMENTED.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import threading
from collections.abc import Callable, Collection, Generator, Iterator, Mapping
from concurrent import futures
from typing import Any, NoReturn, Protocol, TypeVar, runtime_checkable

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2

from fedq import __version__
from fedq.errors import (
    AlreadyConnected,
    ConfigError,
    FedqError,
    ResourceExhausted,
    TransportError,
)
from fedq.transport.budget import BUSY, CallSlots, ServerLimits, UploadBudget
from fedq.transport.counters import ByteCounter, CountingFrames
from fedq.transport.keepalive import Keepalive
from fedq.transport.security import (
    AuthenticationError,
    TlsConfig,
    authenticate,
    check_bind_policy,
    check_certificate_name,
    format_address,
)
from fedq.wire import (
    WireLimits,
    WireMessage,
    message_from_frames,
    message_to_frame_bytes,
    read_message,
)
from fedq.wire.control import (
    PROTOCOL_VERSION,
    Joined,
    Registration,
    WorkItem,
    joined_to_proto,
    registration_from_proto,
    work_item_to_proto,
)
from fedq.wire.pb import service_pb2, service_pb2_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=Message)

ROUNDS_SERVICE = service_pb2.DESCRIPTOR.services_by_name["Rounds"].full_name
SPLIT_SERVICE = service_pb2.DESCRIPTOR.services_by_name["Split"].full_name
#: Largest chunk that keeps every frame under gRPC's default 4 MiB message limit.
MAX_CHUNK_SIZE = 3 << 20
#: Largest single gRPC message the server reads (a frame, a registration); gRPC answers anything
#: larger with RESOURCE_EXHAUSTED before fedq sees it.
MAX_RECEIVE_MESSAGE = 4 << 20
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: Service paths of round protocol 2 (package fedq.v1): each method and whether its request and
#: its reply are streams. A call on one is refused with both protocol versions named.
RETIRED_SERVICES: dict[str, dict[str, tuple[bool, bool]]] = {
    "fedq.v1.Federated": {
        "Register": (False, False),
        "Work": (False, True),
        "GetTask": (False, True),
        "PushUpdate": (True, False),
    },
    "fedq.v1.Split": {"Step": (True, True)},
}
RETIRED_PROTOCOL_VERSION = 2


class TaskHandler(Protocol):
    """Tasks and updates; called from gRPC worker threads (the handler must be thread-safe)."""

    def get_task(self, client_id: str, round: int) -> WireMessage: ...

    def push_update(self, msg: WireMessage) -> None: ...


@runtime_checkable
class RoundHandler(Protocol):
    """Optional: a handler that runs the round loop (the round engine) also gets ``Register`` and
    ``Work``. Both get the authenticated principal; ``work`` yields the principal's work items
    until the run is over or ``closed`` is set (the caller went away). The transport calls
    ``wake`` right after it sets ``closed``, so that a ``work`` waiting for news returns at once
    (the server drops a dead client's clients as soon as its connection closes)."""

    def register(self, principal: str, reg: Registration) -> Joined: ...

    def work(
        self, principal: str, run_id: str, closed: threading.Event
    ) -> Generator[WorkItem, None, None]: ...

    def wake(self) -> None: ...


@runtime_checkable
class SplitHandler(Protocol):
    """Optional: a handler with ``exchange`` (the round engine's in-round exchange, split mode's
    steps) also gets the ``Split`` service."""

    def exchange(self, msg: WireMessage) -> WireMessage: ...


class _Phase(enum.Enum):
    DECODE = "decode"  # parsing untrusted input: bad input is the caller's fault
    HANDLER = "handler"  # the runtime's decision: FedqError is a refused precondition
    ENCODE = "encode"  # serializing our own reply: any failure is a server bug


def _status_for(phase: _Phase, error: Exception) -> grpc.StatusCode:
    """Map a failure to a status code: whose fault it is depends on the phase it happened in."""
    if isinstance(error, ResourceExhausted):  # a server limit, whichever phase met it
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if phase is _Phase.DECODE and isinstance(error, ValueError):  # WireFormatError included
        return grpc.StatusCode.INVALID_ARGUMENT
    if phase is _Phase.HANDLER and isinstance(error, AlreadyConnected):
        return grpc.StatusCode.ALREADY_EXISTS
    if phase is _Phase.HANDLER and isinstance(error, FedqError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def check_chunk_size(limits: WireLimits) -> None:
    if limits.chunk_size > MAX_CHUNK_SIZE:
        raise ConfigError(
            f"transport: chunk_size {limits.chunk_size} exceeds {MAX_CHUNK_SIZE} bytes; frames "
            "must stay under gRPC's 4 MiB message limit"
        )


class _Servicer(service_pb2_grpc.RoundsServicer, service_pb2_grpc.SplitServicer):
    """Implements both services; the Split half is only registered if the handler supports it."""

    def __init__(
        self,
        handler: Any,
        limits: WireLimits,
        tokens: Mapping[str, str] | None,
        counters: ByteCounter,
        hosts: Mapping[str, Collection[str]] | None = None,
        check_cert_name: bool = False,
        server_limits: ServerLimits | None = None,
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._tokens = tokens
        self._counters = counters
        self._hosts = hosts
        self._check_cert_name = check_cert_name
        sl = server_limits or ServerLimits()
        self.budget = UploadBudget(sl.upload_budget_bytes, sl.upload_wait_s)
        self._slots = CallSlots(sl.max_calls_per_principal)

    # -- helpers ---------------------------------------------------------------------------------
    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> NoReturn:
        context.abort(code, reason)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _auth(self, context: grpc.ServicerContext) -> str | None:
        try:
            principal = authenticate(context.invocation_metadata(), self._tokens)
            if self._check_cert_name:
                check_certificate_name(context.auth_context(), principal)
            return principal
        except AuthenticationError as e:
            logger.warning("rejected call from %s: %s", context.peer(), e)
            self._abort(context, grpc.StatusCode.UNAUTHENTICATED, str(e))

    def _check_client(self, context: grpc.ServicerContext, authed: str | None, claimed: str) -> str:
        """``claimed`` if the authenticated principal may act for it (itself, or a client it
        hosts); without authentication any named client is taken as it is."""
        if authed is None or claimed == authed:
            return claimed
        if self._hosts is None or claimed not in self._hosts.get(authed, ()):
            reason = f"client_id {claimed[:80]!r} is not hosted by the authenticated principal"
            self._abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
        return claimed

    def _principal(self, context: grpc.ServicerContext, authed: str | None) -> str:
        if authed is None:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "missing x-fedq-client metadata: who is calling?",
            )
        return authed

    def _run(self, context: grpc.ServicerContext, phase: _Phase, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError:
            raise  # the peer cancelled or the call ended: nothing to report back
        except Exception as e:
            code = _status_for(phase, e)
            if code is grpc.StatusCode.INTERNAL:
                logger.exception("fedq transport: %s step failed", phase.value)
                reason = f"{type(e).__name__}: {e}"
            else:  # a busy upload budget is routine under load (the client retries): no warning
                level = logging.DEBUG if BUSY in str(e) else logging.WARNING
                logger.log(level, "%s from %s: %s", code.name, context.peer(), e)
                reason = str(e)
        self._abort(context, code, reason[:2000])

    def _parse(self, context: grpc.ServicerContext, cls: type[M], data: bytes) -> M:
        """A request message from its bytes (gRPC would answer a parse failure with INTERNAL)."""
        msg = cls()
        try:
            msg.ParseFromString(data)
        except (DecodeError, ValueError, RuntimeError) as e:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{cls.DESCRIPTOR.name}: not a valid message ({e})"[:500],
            )
        return msg

    def _slot(
        self, context: grpc.ServicerContext, stack: contextlib.ExitStack, authed: str | None
    ) -> None:
        """Hold one of the authenticated principal's call slots for this call's life."""
        if authed is not None:
            self._run(context, _Phase.DECODE, lambda: stack.enter_context(self._slots.hold(authed)))

    def _admit(
        self, context: grpc.ServicerContext, who: str, held: list[int]
    ) -> Callable[[Any], None]:
        """The upload budget's admission for a message's header (appends what it reserved)."""

        def admit(header: Any) -> None:
            left = context.time_remaining()
            wait = None if left is None else max(0.0, left - 1.0)
            wait = self.budget.wait_s if wait is None else min(wait, self.budget.wait_s)
            held.append(self.budget.acquire(int(header.payload_size), who, wait))

        return admit

    def _release(self, held: list[int]) -> None:
        while held:
            self.budget.release(held.pop())

    def _frames(self, context: grpc.ServicerContext, msg: WireMessage) -> Iterator[bytes]:
        frames = message_to_frame_bytes(msg, self._limits.chunk_size)
        yield self._run(context, _Phase.ENCODE, lambda: next(frames))  # serializes every tensor
        yield from frames

    # -- Rounds: the round protocol ---------------------------------------------------------------
    def _rounds(self, context: grpc.ServicerContext) -> RoundHandler:
        if not isinstance(self._handler, RoundHandler):
            self._abort(context, grpc.StatusCode.UNIMPLEMENTED, "this server runs no rounds")
        return self._handler

    def Register(self, data: bytes, context: grpc.ServicerContext) -> service_pb2.RegisterReply:
        principal = self._principal(context, self._auth(context))
        with contextlib.ExitStack() as stack:
            self._slot(context, stack, principal)
            return self._register(principal, data, context)

    def _register(
        self, principal: str, data: bytes, context: grpc.ServicerContext
    ) -> service_pb2.RegisterReply:
        rounds = self._rounds(context)
        request = self._parse(context, service_pb2.RegisterRequest, data)
        self._counters.add(principal, up=request.ByteSize(), control=True)
        reg = self._run(
            context, _Phase.DECODE, lambda: registration_from_proto(request, self._limits)
        )
        for c in reg.clients:
            self._check_client(context, principal, c.client_id)
        joined = self._run(context, _Phase.HANDLER, lambda: rounds.register(principal, reg))
        reply = self._run(context, _Phase.ENCODE, lambda: joined_to_proto(joined))
        self._counters.add(principal, down=reply.ByteSize(), control=True)
        return reply

    def Work(self, data: bytes, context: grpc.ServicerContext) -> Iterator[service_pb2.WorkItem]:
        principal = self._principal(context, self._auth(context))
        with contextlib.ExitStack() as stack:
            self._slot(context, stack, principal)
            yield from self._work(principal, data, context)

    def _work(
        self, principal: str, data: bytes, context: grpc.ServicerContext
    ) -> Iterator[service_pb2.WorkItem]:
        rounds = self._rounds(context)
        request = self._parse(context, service_pb2.WorkRequest, data)
        self._counters.add(principal, up=request.ByteSize(), control=True)
        closed = threading.Event()

        def gone() -> None:  # the call ended (the peer went away, or we did)
            closed.set()
            rounds.wake()

        context.add_callback(gone)
        items = self._run(
            context, _Phase.HANDLER, lambda: rounds.work(principal, request.run_id[:200], closed)
        )
        try:
            while True:
                item = self._run(context, _Phase.HANDLER, lambda: next(items, None))
                if item is None:
                    return
                reply = work_item_to_proto(item)
                self._counters.add(principal, down=reply.ByteSize(), control=True)
                yield reply
        finally:
            closed.set()
            items.close()

    # -- Rounds: tasks and updates --------------------------------------------------------------
    def GetTask(self, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        authed = self._auth(context)
        with contextlib.ExitStack() as stack:
            self._slot(context, stack, authed)
            yield from self._get_task(authed, data, context)

    def _get_task(
        self, authed: str | None, data: bytes, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        request = self._parse(context, service_pb2.TaskRequest, data)
        client = self._check_client(context, authed, request.client_id)
        self._counters.add(client, up=request.ByteSize())
        msg = self._run(
            context, _Phase.HANDLER, lambda: self._handler.get_task(client, int(request.round))
        )
        for frame in self._frames(context, msg):
            # Counted as it is handed to gRPC, so the count is complete once the client has the
            # last frame (a reader of the counters never races the tail of this generator).
            self._counters.add(client, down=len(frame))
            yield frame

    def PushUpdate(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> service_pb2.Ack:
        authed = self._auth(context)
        frames = CountingFrames(request_iterator)
        who = authed or ""
        held: list[int] = []
        stack = contextlib.ExitStack()
        try:
            self._slot(context, stack, authed)
            admit = self._admit(context, who, held)
            msg = self._run(
                context, _Phase.DECODE, lambda: message_from_frames(frames, self._limits, admit)
            )
            who = self._check_client(context, authed, msg.client_id)
            ack = service_pb2.Ack(accepted=True, bytes_received=frames.nbytes)
            # Counted before the handler keeps the update: keeping it may close the round at
            # once, and that round's bytes include this upload and its ack. A refused update
            # gets no ack, so the ack's bytes are taken back.
            self._counters.add(who, up=frames.take(), down=ack.ByteSize())
            try:
                self._run(context, _Phase.HANDLER, lambda: self._handler.push_update(msg))
            except BaseException:
                self._counters.add(who, down=-ack.ByteSize())
                raise
            return ack
        finally:
            self._release(held)  # the handler is done with the message
            stack.close()
            self._counters.add(who, up=frames.take())

    # -- Split -----------------------------------------------------------------------------------
    def Step(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """One bidi stream carries any number of steps: read one message, answer with one."""
        authed = self._auth(context)
        frames = CountingFrames(request_iterator)
        who = authed or ""
        held: list[int] = []
        stack = contextlib.ExitStack()
        try:
            self._slot(context, stack, authed)
            admit = self._admit(context, who, held)
            while True:
                msg = self._run(
                    context, _Phase.DECODE, lambda: read_message(frames, self._limits, admit)
                )
                if msg is None:
                    return
                who = self._check_client(context, authed, msg.client_id)
                try:
                    reply = self._run(
                        context, _Phase.HANDLER, functools.partial(self._handler.exchange, msg)
                    )
                finally:
                    del msg  # the step's activations are no longer held here
                    self._release(held)
                # Count the step before its last frame leaves: the client may read the counters
                # as soon as it has the reply, so the bytes must already be there.
                out = list(self._frames(context, reply))
                self._counters.add(who, up=frames.take(), down=sum(len(f) for f in out))
                yield from out
        finally:
            self._release(held)
            stack.close()
            self._counters.add(who, up=frames.take())


# The service tables, written out instead of the generated ``add_*Servicer_to_server``: requests
# get no deserializer, so gRPC hands them over as the bytes they are on the wire and fedq parses
# them (a Frame with fedq.wire.frame, the rest with protobuf), answering bytes that do not parse
# with INVALID_ARGUMENT (gRPC's own deserializer failure is INTERNAL). Replies that are Frames go
# out as bytes; the rest through protobuf.
def _rounds_handlers(servicer: _Servicer) -> dict[str, grpc.RpcMethodHandler]:
    return {
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register, response_serializer=service_pb2.RegisterReply.SerializeToString
        ),
        "Work": grpc.unary_stream_rpc_method_handler(
            servicer.Work, response_serializer=service_pb2.WorkItem.SerializeToString
        ),
        "GetTask": grpc.unary_stream_rpc_method_handler(servicer.GetTask),
        "PushUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.PushUpdate, response_serializer=service_pb2.Ack.SerializeToString
        ),
    }


def _split_handlers(servicer: _Servicer) -> dict[str, grpc.RpcMethodHandler]:
    return {"Step": grpc.stream_stream_rpc_method_handler(servicer.Step)}


def _health_handlers(
    servicer: _Servicer, health_servicer: health.HealthServicer
) -> dict[str, grpc.RpcMethodHandler]:
    """grpc_health's servicer behind fedq's parsing of the request bytes (see above)."""

    def check(data: bytes, context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        request = servicer._parse(context, health_pb2.HealthCheckRequest, data)
        return health_servicer.Check(request, context)

    def watch(data: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
        request = servicer._parse(context, health_pb2.HealthCheckRequest, data)
        yield from health_servicer.Watch(request, context)

    def list_(data: bytes, context: grpc.ServicerContext) -> health_pb2.HealthListResponse:
        request = servicer._parse(context, health_pb2.HealthListRequest, data)
        return health_servicer.List(request, context)

    out = health_pb2.HealthCheckResponse.SerializeToString
    return {
        "Check": grpc.unary_unary_rpc_method_handler(check, response_serializer=out),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, response_serializer=out),
        "List": grpc.unary_unary_rpc_method_handler(
            list_, response_serializer=health_pb2.HealthListResponse.SerializeToString
        ),
    }


def _retired_handlers(
    service: str, methods: Mapping[str, tuple[bool, bool]]
) -> dict[str, grpc.RpcMethodHandler]:
    """Handlers that refuse every call on a retired service path, before reading a request."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    reason = (
        f"{service} is round protocol {RETIRED_PROTOCOL_VERSION}; this server speaks round "
        f"protocol {PROTOCOL_VERSION} (fedq {__version__}, service {ROUNDS_SERVICE}): install "
        "the same fedq release on both sides"
    )

    def refuse(request: object, context: grpc.ServicerContext) -> NoReturn:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    return {method: kinds[streams](refuse) for method, streams in methods.items()}


def _add_service(
    server: grpc.Server, name: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> None:
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(name, handlers)])
    server.add_registered_method_handlers(name, handlers)


class TransportServer:
    """Serves a handler over gRPC (see module docstring). Use as a context manager or call
    :meth:`start` / :meth:`stop`. ``counters`` holds the bytes that crossed, per client.

    Each in-flight call holds one of ``max_workers`` threads, and an open work stream or split
    stream holds one for its whole life: size ``max_workers`` above twice the number of
    connected principals. The handler is called from those threads and must be thread-safe.
    """

    def __init__(
        self,
        handler: TaskHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: WireLimits | None = None,
        tokens: Mapping[str, str] | None = None,
        hosts: Mapping[str, Collection[str]] | None = None,
        tls: TlsConfig | None = None,
        max_workers: int = 8,
        allow_insecure: bool = False,
        server_limits: ServerLimits | None = None,
        keepalive: Keepalive | None = None,
    ) -> None:
        self._limits = limits or WireLimits()
        self.keepalive = keepalive or Keepalive()
        self._server_limits = server_limits or ServerLimits()
        self._servicer: _Servicer | None = None
        check_bind_policy(host, tls, allow_insecure)
        check_chunk_size(self._limits)
        self.host = host
        self.port = port
        self.counters = ByteCounter()
        self._handler = handler
        self._tokens = dict(tokens) if tokens is not None else None
        self._hosts = {p: frozenset(c) for p, c in hosts.items()} if hosts is not None else None
        self._tls = tls
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def upload_budget(self) -> UploadBudget | None:
        """The upload budget of the running server (its ``in_use`` and ``peak``)."""
        return None if self._servicer is None else self._servicer.budget

    @property
    def serves_split(self) -> bool:
        return isinstance(self._handler, SplitHandler)

    def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with ``port=0``)."""
        if self._server is not None:
            raise FedqError("transport server already started")
        pool = futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="fedq-grpc")
        # Calls beyond the worker threads are refused (RESOURCE_EXHAUSTED), not queued unseen.
        server = grpc.server(
            pool,
            maximum_concurrent_rpcs=self._max_workers,
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE),
                *self.keepalive.server_options(),
            ],
        )
        mtls = self._tls is not None and self._tls.require_client_cert
        servicer = _Servicer(
            self._handler,
            self._limits,
            self._tokens,
            self.counters,
            self._hosts,
            check_cert_name=mtls,
            server_limits=self._server_limits,
        )
        self._servicer = servicer
        _add_service(server, ROUNDS_SERVICE, _rounds_handlers(servicer))
        services = ["", ROUNDS_SERVICE]
        if self.serves_split:
            _add_service(server, SPLIT_SERVICE, _split_handlers(servicer))
            services.append(SPLIT_SERVICE)
        _add_service(server, HEALTH_SERVICE, _health_handlers(servicer, self._health))
        for name, methods in RETIRED_SERVICES.items():
            _add_service(server, name, _retired_handlers(name, methods))
        addr = format_address(self.host, self.port)
        try:
            if self._tls is None:
                bound = server.add_insecure_port(addr)
            else:
                bound = server.add_secure_port(addr, self._tls.server_credentials())
        except RuntimeError as e:
            raise TransportError("UNAVAILABLE", f"cannot bind {addr}: {e}") from e
        if not bound:
            raise TransportError("UNAVAILABLE", f"cannot bind {addr}")
        server.start()
        for name in services:
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server, self.port = server, bound
        logger.info("fedq transport serving %s on %s", services[1:], self.address)
        return bound

    def stop(self, grace: float = 1.0) -> None:
        """Mark NOT_SERVING, let in-flight calls finish for up to ``grace`` seconds, then stop."""
        if self._server is None:
            return
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self._server = None
        logger.info("fedq transport on %s stopped", self.address)

    def __enter__(self) -> TransportServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
