"""ByteCounter: exact totals under concurrent updates; take() snapshots and resets atomically; an
update's bytes are counted before the handler can close its round."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
import torch
from support.loopback import LoopbackConnection

from fedq.codec import raw
from fedq.errors import FedqError, TransportError
from fedq.transport import ByteCounter, TransportClient, TransportServer
from fedq.wire import WireMessage, message_to_frames
from fedq.wire.pb import service_pb2


def test_concurrent_adds_are_exact_and_take_resets() -> None:
    counter = ByteCounter()

    def work(cid: str) -> None:
        for _ in range(2000):
            counter.add(cid, up=3, down=5)

    threads = [threading.Thread(target=work, args=(f"c{i % 4}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (counter.bytes_up, counter.bytes_down) == (8 * 2000 * 3, 8 * 2000 * 5)
    snap = counter.take()
    assert snap["clients"]["c0"] == {"bytes_up": 2 * 2000 * 3, "bytes_down": 2 * 2000 * 5}
    assert snap["bytes_up"] == 48_000 and len(snap["clients"]) == 4
    assert counter.snapshot() == {
        "bytes_up": 0,
        "bytes_down": 0,
        "clients": {},
        "control_up": 0,
        "control_down": 0,
    }
    counter.add("c9", up=1)
    counter.reset()
    assert counter.bytes_up == 0


def test_control_plane_bytes_are_kept_apart_from_client_data() -> None:
    """Registration and work-stream bytes count per principal, outside the clients' data bytes,
    so a round's data bytes do not depend on how clients are grouped into processes."""
    counter = ByteCounter()
    counter.add("client-1", up=10, down=20)
    counter.add("worker-0", up=7, down=3, control=True)
    snap = counter.take()
    assert (snap["bytes_up"], snap["bytes_down"]) == (10, 20)
    assert (snap["control_up"], snap["control_down"]) == (7, 3)
    assert set(snap["clients"]) == {"client-1"}
    assert counter.take()["control_up"] == 0


class _Closing:
    """A handler whose accepted update may close the round at once (the round engine): it reads
    the server's counters the moment it keeps an update, as the round's record would."""

    def __init__(self) -> None:
        self.counters: ByteCounter | None = None
        self.seen: list[Any] = []

    def get_task(self, client_id: str, round: int) -> WireMessage:
        raise FedqError("no tasks here")

    def push_update(self, msg: WireMessage) -> None:
        if msg.round == 1:
            raise FedqError("round 1 is closed")
        assert self.counters is not None
        self.seen.append(self.counters.snapshot()["clients"].get(msg.client_id))


@pytest.mark.parametrize("over_grpc", [False, True], ids=["loopback", "grpc"])
def test_an_update_and_its_ack_are_counted_before_the_handler_keeps_it(over_grpc: bool) -> None:
    handler = _Closing()
    update = WireMessage.update("c1", 0, tensors={"w": raw(torch.ones(5))})
    up = sum(f.ByteSize() for f in message_to_frames(update))
    ack = service_pb2.Ack(accepted=True, bytes_received=up).ByteSize()
    server = TransportServer(handler) if over_grpc else None
    conn: Any
    if server is not None:
        server.start()
        conn, handler.counters = TransportClient(server.address, client_id="c1"), server.counters
    else:
        handler.counters = ByteCounter()
        conn = LoopbackConnection(handler, client_id="c1", counters=handler.counters)
    try:
        assert conn.push_update(update) == up
        assert handler.seen == [{"bytes_up": up, "bytes_down": ack}]
        # a refused update: its upload crossed and counts on both ends, no ack came back
        late = dataclasses.replace(update, round=1)
        up += sum(f.ByteSize() for f in message_to_frames(late))
        with pytest.raises((FedqError, TransportError), match="round 1 is closed"):
            conn.push_update(late)
        assert handler.counters.snapshot()["clients"]["c1"] == {"bytes_up": up, "bytes_down": ack}
        assert (conn.bytes_sent, conn.bytes_received) == (up, ack)
    finally:
        conn.close()
        if server is not None:
            server.stop(0.1)
