"""What a server holds at once: the upload budget (admission by declared size, refusal at once when
busy, clients retrying after a backoff, never more admitted than the budget), calls per principal,
and gRPC's own caps. Beyond a limit a call ends with RESOURCE_EXHAUSTED and a reason; other
clients are served meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from fedq.bench.flood import flood
from fedq.codec import quantize
from fedq.errors import ResourceExhausted, TransportError
from fedq.transport import TransportClient, TransportServer
from fedq.transport.budget import BUSY, CallSlots, ServerLimits, UploadBudget
from fedq.wire import WireMessage, message_to_frame_bytes

TOKENS = {"c1": "secret-1", "c2": "secret-2"}


def test_budget_admits_up_to_its_size_and_refuses_the_rest_with_a_reason() -> None:
    b = UploadBudget(100)
    assert b.acquire(60, "c1") == 60
    with pytest.raises(ResourceExhausted, match=BUSY):
        b.acquire(50, "c2")  # busy: refused at once (no waiting by default)
    with pytest.raises(ResourceExhausted, match="exceeds the server's upload budget"):
        b.acquire(101, "c2")  # never fits
    b.release(60)
    assert b.acquire(100, "c2") == 100 and b.peak == 100 and b.refused == 2
    waiting = UploadBudget(100, wait_s=5.0)
    waiting.acquire(100, "c1")
    threading.Timer(0.2, waiting.release, args=(100,)).start()
    assert waiting.acquire(80, "c2") == 80  # waited for the release


def test_calls_per_principal_are_capped() -> None:
    slots = CallSlots(2)
    with slots.hold("c1"), slots.hold("c1"):
        with pytest.raises(ResourceExhausted, match="2 calls in flight"), slots.hold("c1"):
            pass
        with slots.hold("c2"):
            assert slots.in_flight("c2") == 1
    assert slots.in_flight("c1") == 0


class Slow:
    """Keeps each update (and split step) until ``gate`` opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.updates: list[str] = []

    def get_task(self, client_id: str, round: int) -> WireMessage:
        return WireMessage.global_model(client_id, round)

    def push_update(self, msg: WireMessage) -> None:
        self.gate.wait(20)
        self.updates.append(msg.client_id)

    def exchange(self, msg: WireMessage) -> WireMessage:
        self.gate.wait(20)
        return WireMessage.gradients(msg.client_id, msg.round, msg.step)


def _update(cid: str, kib: int) -> WireMessage:
    x = torch.randn(kib * 128, 8)  # 8-bit codes, one byte each: kib KiB of payload
    return WireMessage.update(cid, 0, tensors={"w": quantize(x, 8)})


@pytest.fixture
def slow() -> Iterator[tuple[Slow, TransportServer]]:
    handler = Slow()
    limits = ServerLimits(upload_budget_bytes=96 << 10, max_calls_per_principal=2)
    with TransportServer(handler, tokens=TOKENS, server_limits=limits, max_workers=16) as srv:
        yield handler, srv
    handler.gate.set()


def test_a_busy_budget_refuses_then_the_client_retries_and_gets_in(slow) -> None:
    handler, srv = slow
    first = TransportClient(srv.address, client_id="c1", token=TOKENS["c1"], timeout=30)
    second = TransportClient(srv.address, client_id="c2", token=TOKENS["c2"], timeout=30)
    t = threading.Thread(target=first.push_update, args=(_update("c1", 64),))
    t.start()  # holds 64 KiB of the 96 KiB budget until the gate opens
    end = time.monotonic() + 10
    while srv.upload_budget is None or not srv.upload_budget.in_use:
        assert time.monotonic() < end and t.is_alive(), "the first upload was not admitted"
        time.sleep(0.01)
    threading.Timer(0.5, handler.gate.set).start()
    second.push_update(_update("c2", 64))  # refused while c1 holds the budget, then retried
    t.join(10)
    assert sorted(handler.updates) == ["c1", "c2"] and second.budget_retries >= 1
    assert srv.upload_budget.peak <= 96 << 10 and srv.upload_budget.in_use == 0
    with pytest.raises(TransportError, match=r"RESOURCE_EXHAUSTED.*exceeds the server's upload"):
        second.push_update(_update("c2", 200))  # can never fit: no retry
    first.close()
    second.close()


def test_too_many_calls_from_one_principal_are_refused_while_others_are_served(slow) -> None:
    handler, srv = slow
    md = [("x-fedq-client", "c1"), ("authorization", "Bearer secret-1")]
    frames = list(message_to_frame_bytes(_update("c1", 1)))
    with grpc.insecure_channel(srv.address) as ch:
        step = ch.stream_stream("/fedq.v2.Split/Step")
        held = [step(iter(frames), metadata=md, timeout=20) for _ in range(2)]
        time.sleep(0.5)  # both are inside the handler, each holding one of c1's two slots
        with pytest.raises(grpc.RpcError) as e:
            list(step(iter(frames), metadata=md, timeout=20))
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "calls in flight" in e.value.details()
        with TransportClient(srv.address, client_id="c2", token=TOKENS["c2"], timeout=20) as c2:
            assert c2.get_task(3).round == 3  # another principal is served meanwhile
        handler.gate.set()
        for call in held:
            assert len(list(call)) == 1


def test_a_frame_over_grpcs_message_cap_is_refused_by_grpc() -> None:
    with TransportServer(Slow(), tokens=TOKENS) as srv, grpc.insecure_channel(srv.address) as ch:
        push = ch.stream_unary("/fedq.v2.Rounds/PushUpdate")
        md = [("x-fedq-client", "c1"), ("authorization", "Bearer secret-1")]
        with pytest.raises(grpc.RpcError) as e:
            push(iter([b"\x0a" + b"\xff" * (5 << 20)]), metadata=md, timeout=20)
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_flood_of_large_uploads_stays_within_the_budget() -> None:
    """Many valid clients upload at once against a server process with a small budget: every
    upload is accepted (refused ones retried), the budget never admits more than its size, and
    the server's memory stays near the budget (its buffer pool and gRPC windows on top)."""
    r = flood(clients=8, size_mib=4, budget_mib=12, hold_s=0.2, waves=2)
    assert r["accepted"] == r["uploads"] == 16 and not r["errors"]
    assert r["budget_peak_mib"] <= 12
    assert r["refused"] > 0 and r["client_retries"] == r["refused"]  # the budget did bind
    # budget + up to four idle pooled payload buffers (4.5 MiB each) + allocator/gRPC slack
    assert r["peak_rss_over_idle_mib"] < 12 + 4 * 4.5 + 48, r
