"""In-process connection with the same interface as :class:`TransportClient`.

Messages still go through the real wire framing (serialize, chunk, reassemble, validate) and bytes
are counted exactly as the gRPC path counts them (frames + TaskRequest + Ack), so a run over
loopback and a run over gRPC must agree bit for bit and byte for byte (the parity test checks it).
"""

from __future__ import annotations

from fedq.transport.counters import ByteCounter
from fedq.transport.server import FederatedHandler
from fedq.wire import WireLimits, WireMessage, message_from_frames, message_to_frames
from fedq.wire.pb import service_pb2


class LoopbackConnection:
    def __init__(
        self,
        handler: FederatedHandler,
        *,
        client_id: str,
        counters: ByteCounter,
        limits: WireLimits | None = None,
    ) -> None:
        self.handler = handler
        self.client_id = client_id
        self.counters = counters
        self.limits = limits or WireLimits()
        self.bytes_sent = 0
        self.bytes_received = 0

    def _count(self, up: int, down: int) -> None:
        self.counters.add(self.client_id, up=up, down=down)
        self.bytes_sent += up
        self.bytes_received += down

    def get_task(self, round: int) -> WireMessage:
        request = service_pb2.TaskRequest(client_id=self.client_id, round=round)
        msg = self.handler.get_task(self.client_id, round)
        frames = list(message_to_frames(msg, self.limits.chunk_size))
        self._count(request.ByteSize(), sum(f.ByteSize() for f in frames))
        return message_from_frames(frames, self.limits)

    def push_update(self, msg: WireMessage) -> int:
        frames = list(message_to_frames(msg, self.limits.chunk_size))
        up = sum(f.ByteSize() for f in frames)
        self.handler.push_update(message_from_frames(frames, self.limits))
        ack = service_pb2.Ack(accepted=True, bytes_received=up)
        self._count(up, ack.ByteSize())
        return up
