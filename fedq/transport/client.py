"""gRPC client for fedq: register, follow the work stream, pull tasks, push updates, run split
steps, over one reused channel.

A client authenticates as a principal (``client_id``: its own id, or a simulation worker's) and
every message names the logical client it is for; ``counters`` counts the bytes per logical
client exactly as the server counts them, ``bytes_sent`` / ``bytes_received`` in total.

Every call streams 1 MiB frames (docs/platform.md §4: fastest over gRPC, and below its 4 MiB default
message cap, so no channel options are needed). Failures of the call come back as
:class:`~fedq.errors.TransportError` carrying the status code name and the server's reason;
malformed data from the server raises :class:`~fedq.errors.WireFormatError`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedq import __version__
from fedq.errors import TlsMismatch, TransportError
from fedq.transport.budget import BUSY
from fedq.transport.counters import ByteCounter, CountingFrames
from fedq.transport.keepalive import Keepalive
from fedq.transport.security import TlsConfig, client_metadata
from fedq.transport.server import ROUNDS_SERVICE, SPLIT_SERVICE, check_chunk_size
from fedq.transport.tlsprobe import diagnose_tls
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
    joined_from_proto,
    registration_to_proto,
    work_item_from_proto,
)
from fedq.wire.pb import service_pb2, service_pb2_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Longest wait between two attempts of an upload the server's busy budget refused.
BUSY_BACKOFF_CAP_S = 2.0


def _transport_error(e: grpc.RpcError) -> TransportError:
    code = e.code() if isinstance(e, grpc.Call) else None
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    return TransportError(code.name if code is not None else "UNKNOWN", details or "")


def _no_rounds_service(target: str) -> str:
    """Why ``Register`` met gRPC's UNIMPLEMENTED: the server has no ``Rounds`` service."""
    return (
        f"the server at {target} does not serve {ROUNDS_SERVICE}: it is not fedq, or an older "
        f"fedq (round protocol 2, service fedq.v1.Federated); this client speaks round protocol "
        f"{PROTOCOL_VERSION} (fedq {__version__}): install the same fedq release on both sides"
    )


class _SplitStream:
    """One open bidi ``Split.Step`` stream: each step queues a message's frames and reads one reply.

    The request side is a generator fed from a queue (gRPC consumes it on its own thread), so the
    stream stays open between steps and no frame is built before gRPC asks for it.
    """

    _CLOSE = None

    def __init__(self, step: grpc.StreamStreamMultiCallable, client: TransportClient) -> None:
        self._queue: queue.SimpleQueue[Iterator[bytes] | None] = queue.SimpleQueue()
        self._client = client
        self._sent = CountingFrames(self._requests())
        self._calls = step(self._sent, metadata=client._metadata)
        self._received = CountingFrames(self._calls)

    def _requests(self) -> Iterator[bytes]:
        while (frames := self._queue.get()) is not self._CLOSE:
            yield from frames

    def step(self, msg: WireMessage) -> WireMessage:
        frames = message_to_frame_bytes(msg, self._client.limits.chunk_size)
        first = next(frames)  # encode now, so a bad message fails here and not in gRPC's thread
        self._queue.put(itertools.chain([first], frames))
        try:
            reply = read_message(self._received, self._client.limits)
        finally:
            self._client._count(
                msg.client_id, sent=self._sent.take(), received=self._received.take()
            )
        if reply is None:
            raise TransportError("UNAVAILABLE", "split stream closed by the server")
        return reply

    def close(self) -> None:
        self._queue.put(self._CLOSE)
        self._calls.cancel()


class WorkStream:
    """The principal's open ``Work`` stream: iterate for :class:`~fedq.wire.control.WorkItem`;
    ``cancel()`` closes it (from any thread). A broken stream raises TransportError."""

    def __init__(self, call: Any, client: TransportClient) -> None:
        self._call = call
        self._client = client

    def __iter__(self) -> Iterator[WorkItem]:
        try:
            for msg in self._call:
                self._client._count(None, received=msg.ByteSize())
                yield work_item_from_proto(msg)
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.CANCELLED and self._cancelled:
                return
            raise _transport_error(e) from e

    _cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class TransportClient:
    """A client of one fedq server. Not meant for concurrent calls from several threads, except
    that the counters are thread-safe and the work stream may be read in its own thread."""

    def __init__(
        self,
        target: str,
        *,
        client_id: str,
        token: str | None = None,
        limits: WireLimits | None = None,
        tls: TlsConfig | None = None,
        timeout: float = 120.0,
        keepalive: Keepalive | None = None,
    ) -> None:
        self.target = target
        self.tls = tls
        self.client_id = client_id  # the principal
        self.limits = limits or WireLimits()
        check_chunk_size(self.limits)
        self.timeout = timeout
        self._metadata = client_metadata(client_id, token)
        # keepalive pings notice a server that vanished while a long-lived stream is idle, at an
        # interval the server accepts (fedq.transport.keepalive)
        options = (keepalive or Keepalive()).client_options()
        if tls is None:
            self._channel = grpc.insecure_channel(target, options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(target, tls.channel_credentials(), options)
        self._rounds = service_pb2_grpc.RoundsStub(self._channel)
        # The Frame streams carry frames as the bytes they are on the wire (no (de)serializer):
        # fedq.wire.frame builds and parses them without protobuf objects for the payload.
        self._get_task = self._channel.unary_stream(
            f"/{ROUNDS_SERVICE}/GetTask",
            request_serializer=service_pb2.TaskRequest.SerializeToString,
        )
        self._push_update = self._channel.stream_unary(
            f"/{ROUNDS_SERVICE}/PushUpdate", response_deserializer=service_pb2.Ack.FromString
        )
        self._step = self._channel.stream_stream(f"/{SPLIT_SERVICE}/Step")
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._lock = threading.Lock()
        self._split_lock = threading.Lock()
        self._split: _SplitStream | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.counters = ByteCounter()
        self.budget_retries = 0  # uploads refused by a busy server budget, then sent again
        self._rng = random.Random()

    def _count(self, client_id: str | None, *, sent: int = 0, received: int = 0) -> None:
        """Count a call's bytes: under the logical client it was for (``None``: control plane,
        under the principal)."""
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received
        self.counters.add(
            client_id or self.client_id, up=sent, down=received, control=client_id is None
        )

    def register(self, reg: Registration) -> Joined:
        """Register this principal's logical clients with the server. Registering again (after
        the server went away) also closes a split stream left open from before: it may belong
        to a server that is gone, and the next step opens a fresh one. A refused TLS handshake
        raises :class:`~fedq.errors.TlsMismatch` naming the option to change
        (fedq.transport.tlsprobe); a server that is down, plain UNAVAILABLE."""
        with self._split_lock:
            self._drop_split()
        request = registration_to_proto(reg)
        self._count(None, sent=request.ByteSize())
        try:
            reply = self._rounds.Register(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            error = _transport_error(e)
            if error.code == "UNAVAILABLE":  # down, or a TLS mistake that a retry cannot fix?
                why = diagnose_tls(self.target, self.tls)
                if why is not None:
                    raise TlsMismatch(error.code, why) from e
            if error.code == "UNIMPLEMENTED" and "Method not found" in error.reason:
                raise TransportError(error.code, _no_rounds_service(self.target)) from e
            raise error from e
        self._count(None, received=reply.ByteSize())
        return joined_from_proto(reply)

    def work(self, run_id: str) -> WorkStream:
        """Open the work stream of ``run_id`` (no deadline: it lives as long as the run)."""
        request = service_pb2.WorkRequest(run_id=run_id)
        self._count(None, sent=request.ByteSize())
        return WorkStream(self._rounds.Work(request, metadata=self._metadata), self)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server's health service reports the Rounds service SERVING."""
        request = health_pb2.HealthCheckRequest(service=ROUNDS_SERVICE)
        try:
            reply = self._health.Check(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            raise _transport_error(e) from e
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise TransportError("UNAVAILABLE", f"server {self.target} is {status}")

    def get_task(self, round: int, client_id: str | None = None) -> WireMessage:
        """Download the task of logical client ``client_id`` (default: the principal itself) for
        ``round``: the global parameters or client state and its instructions."""
        cid = client_id or self.client_id
        request = service_pb2.TaskRequest(client_id=cid, round=round)
        self._count(cid, sent=request.ByteSize())
        call = self._get_task(request, metadata=self._metadata, timeout=self.timeout)
        frames = CountingFrames(call)
        try:
            return message_from_frames(frames, self.limits)
        except grpc.RpcError as e:
            raise _transport_error(e) from e
        except BaseException:
            call.cancel()
            raise
        finally:
            self._count(cid, received=frames.nbytes)

    def _retrying(self, call: Callable[[], T]) -> T:
        """``call()``, again after a full-jitter backoff while the server refuses it because its
        upload budget is busy (fedq.transport.budget), until ``timeout`` has passed. The bytes
        of a refused attempt count as sent: they left this client."""
        end = time.monotonic() + self.timeout
        attempt = 0
        while True:
            try:
                return call()
            except TransportError as e:
                if e.code != "RESOURCE_EXHAUSTED" or BUSY not in e.reason:
                    raise
                cap = min(BUSY_BACKOFF_CAP_S, 0.05 * 2.0 ** min(attempt, 20))
                wait = self._rng.uniform(0.0, cap)
                if time.monotonic() + wait > end:
                    raise
                attempt += 1
                self.budget_retries += 1
                time.sleep(wait)

    def push_update(self, msg: WireMessage) -> int:
        """Upload ``msg``; returns the bytes sent (the sum of the frames' serialized sizes)."""
        return self._retrying(lambda: self._push_once(msg))

    def _push_once(self, msg: WireMessage) -> int:
        frames = message_to_frame_bytes(msg, self.limits.chunk_size)
        first = next(frames)  # encode before the call, so encoding errors surface as themselves
        sent = CountingFrames(itertools.chain([first], frames))
        try:
            ack = self._push_update(sent, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _transport_error(e) from e
        finally:
            self._count(msg.client_id, sent=sent.nbytes)
        self._count(msg.client_id, received=ack.ByteSize())
        if not ack.accepted:
            raise TransportError("REJECTED", ack.reason)
        if ack.bytes_received != sent.nbytes:
            logger.warning(
                "server counted %d bytes, client sent %d", ack.bytes_received, sent.nbytes
            )
        return sent.nbytes

    def split_step(self, msg: WireMessage) -> WireMessage:
        """Send one split-learning message (activations) and return the reply (gradients).

        Steps share one open bidi stream; after a failure the stream is dropped and the next step
        opens a new one. The stream has no deadline (it lives across steps), so ``timeout`` does
        not apply here; a dead server surfaces as UNAVAILABLE through gRPC keepalive/close.
        """
        return self._retrying(lambda: self._step_once(msg))

    def _step_once(self, msg: WireMessage) -> WireMessage:
        with self._split_lock:
            if self._split is None:
                self._split = _SplitStream(self._step, self)
            try:
                return self._split.step(msg)
            except grpc.RpcError as e:
                self._drop_split()
                raise _transport_error(e) from e
            except BaseException:
                self._drop_split()
                raise

    def _drop_split(self) -> None:
        if self._split is not None:
            self._split.close()
            self._split = None

    def close(self) -> None:
        with self._split_lock:
            self._drop_split()
        self._channel.close()

    def __enter__(self) -> TransportClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
