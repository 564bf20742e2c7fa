"""An in-process connection for tests, with the interface of
:class:`fedq.transport.TransportClient` (the round engine's ``Connection``).

Messages still go through the real wire framing (serialize, chunk, reassemble, validate), the
control messages through their protobuf serde, and bytes are counted exactly as the gRPC path
counts them (frames, TaskRequests, Acks, registration and work items), so a run over loopback and
a run over gRPC agree bit for bit and byte for byte (the parity tests check it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from fedq.transport.counters import ByteCounter, CountingFrames
from fedq.wire import WireLimits, WireMessage, message_from_frames, message_to_frame_bytes
from fedq.wire.control import (
    Joined,
    Registration,
    WorkItem,
    joined_from_proto,
    joined_to_proto,
    registration_from_proto,
    registration_to_proto,
    work_item_from_proto,
    work_item_to_proto,
)
from fedq.wire.pb import service_pb2


class _Feed:
    """The handler's work generator, read in process; ``cancel`` ends it as a closed stream."""

    def __init__(self, conn: LoopbackConnection, run_id: str) -> None:
        self._conn = conn
        self._closed = threading.Event()
        self._items = conn.handler.work(conn.client_id, run_id, self._closed)

    def __iter__(self) -> Iterator[WorkItem]:
        try:
            for item in self._items:
                reply = work_item_to_proto(item)
                self._conn._count(None, 0, reply.ByteSize())
                yield work_item_from_proto(reply)
                if self._closed.is_set():
                    return
        finally:
            self._items.close()

    def cancel(self) -> None:
        self._closed.set()
        self._conn.handler.wake()


class LoopbackConnection:
    """A principal (``client_id``) talking to ``handler`` in process; ``counters`` is the
    server side's counter (shared by every connection of a test), ``own`` this end's."""

    def __init__(
        self,
        handler: Any,
        *,
        client_id: str,
        counters: ByteCounter,
        limits: WireLimits | None = None,
    ) -> None:
        self.handler = handler
        self.client_id = client_id
        self.server_counters = counters
        self.counters = ByteCounter()
        self.limits = limits or WireLimits()
        self.bytes_sent = 0
        self.bytes_received = 0

    def _count(self, client: str | None, up: int, down: int) -> None:
        who = client or self.client_id
        self.server_counters.add(who, up=up, down=down, control=client is None)
        self.counters.add(who, up=up, down=down, control=client is None)
        self.bytes_sent += up
        self.bytes_received += down

    def _frames(self, msg: WireMessage) -> tuple[WireMessage, int]:
        frames = CountingFrames(message_to_frame_bytes(msg, self.limits.chunk_size))
        return message_from_frames(frames, self.limits), frames.nbytes

    def register(self, reg: Registration) -> Joined:
        request = registration_to_proto(reg)
        joined = self.handler.register(
            self.client_id, registration_from_proto(request, self.limits)
        )
        reply = joined_to_proto(joined)
        self._count(None, request.ByteSize(), reply.ByteSize())
        return joined_from_proto(reply)

    def work(self, run_id: str) -> _Feed:
        self._count(None, service_pb2.WorkRequest(run_id=run_id).ByteSize(), 0)
        return _Feed(self, run_id)

    # The data calls count like the gRPC servicer: what was sent counts even when refused.
    def get_task(self, round: int, client_id: str | None = None) -> WireMessage:
        cid = client_id or self.client_id
        self._count(cid, service_pb2.TaskRequest(client_id=cid, round=round).ByteSize(), 0)
        msg, down = self._frames(self.handler.get_task(cid, round))
        self._count(cid, 0, down)
        return msg

    def push_update(self, msg: WireMessage) -> int:
        decoded, up = self._frames(msg)
        ack = service_pb2.Ack(accepted=True, bytes_received=up).ByteSize()
        self._count(msg.client_id, up, ack)  # before the handler, as the servicer counts
        try:
            self.handler.push_update(decoded)
        except BaseException:
            self._count(msg.client_id, 0, -ack)  # refused: no ack
            raise
        return up

    def split_step(self, msg: WireMessage) -> WireMessage:
        decoded, up = self._frames(msg)
        self._count(msg.client_id, up, 0)
        reply, down = self._frames(self.handler.exchange(decoded))
        self._count(msg.client_id, 0, down)
        return reply

    def close(self) -> None:
        return None
