"""Payload buffers: allocated only once a quarter of the declared size has arrived, and recycled
only when no tensor views them any more."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest
import torch

from fedq.codec import FORMAT_VERSION, raw
from fedq.errors import WireFormatError
from fedq.wire import WireLimits, WireMessage, message_from_frames, message_to_frame_bytes
from fedq.wire import message as wire_message
from fedq.wire.buffers import MIN_POOLED, BufferPool
from fedq.wire.frame import encode_chunk_frame, encode_header_frame
from fedq.wire.pb import tensor_pb2 as pb

LIMITS = WireLimits()
MiB = 1 << 20


def _addr(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def test_a_buffer_returns_to_the_pool_once_nothing_views_it() -> None:
    pool = BufferPool()
    size = 3 * MIN_POOLED
    buf = pool.take(size)
    assert len(buf) == size and not buf.readonly
    addr = _addr(buf)
    payload = torch.frombuffer(buf[10:20], dtype=torch.uint8)  # as a decoded tensor views it
    del buf
    assert pool.free_blocks() == 0  # the tensor still uses it
    other = pool.take(size)
    assert _addr(other) != addr and pool.reused == 0
    del payload
    assert pool.free_blocks() == 1
    again = pool.take(size)
    assert _addr(again) == addr and pool.reused == 1
    del other, again
    assert pool.free_blocks() == 2
    again = pool.take(size)
    piece = np.frombuffer(again, dtype=np.uint8)[5:9][1:]  # numpy views of it count as well
    del again
    assert pool.free_blocks() == 1
    del piece
    assert pool.free_blocks() == 2


def test_a_block_serves_only_sizes_close_to_its_own() -> None:
    pool = BufferPool()
    size = 4 * MIN_POOLED
    pool.take(size)  # dropped at once: back in the pool, with 1/8 of slack
    assert pool.free_blocks() == 1
    pool.take(2 * size)  # too large for it
    pool.take(size // 2)  # would waste more than a quarter of it
    assert pool.reused == 0
    pool.take(size + size // 10)
    assert pool.reused == 1


def test_small_buffers_are_not_pooled_and_free_blocks_are_bounded() -> None:
    pool = BufferPool(max_free=2)
    pool.take(MIN_POOLED - 1)
    assert pool.free_blocks() == 0
    bufs = [pool.take(MIN_POOLED + i) for i in range(5)]
    del bufs
    assert pool.free_blocks() == 2


def test_buffers_come_back_from_other_threads() -> None:
    pool = BufferPool()
    holder = [pool.take(MIN_POOLED)]
    worker = threading.Thread(target=holder.clear)
    worker.start()
    worker.join()
    assert pool.free_blocks() == 1


def _big_message(seed: int) -> WireMessage:
    x = torch.randn(3 * MiB // 8, generator=torch.Generator().manual_seed(seed))
    return WireMessage.update("c", tensors={"w": raw(x), "v": raw(x[:5])})


def test_received_payloads_reuse_memory_only_after_their_tensors_are_gone() -> None:
    frames = list(message_to_frame_bytes(_big_message(0)))
    expected = _big_message(0).tensors["w"].payload
    first = message_from_frames(frames, LIMITS)
    second = message_from_frames(frames, LIMITS)
    ptrs = {m.tensors["w"].payload.data_ptr() for m in (first, second)}
    assert len(ptrs) == 2  # both alive: two buffers
    kept = first.tensors["v"].payload  # one small tensor keeps the whole buffer in use
    del first
    third = message_from_frames(frames, LIMITS)
    assert third.tensors["w"].payload.data_ptr() not in ptrs
    del kept
    reused = wire_message.PAYLOAD_BUFFERS.reused
    fourth = message_from_frames(frames, LIMITS)
    assert wire_message.PAYLOAD_BUFFERS.reused == reused + 1
    fourth.tensors["w"].payload.zero_()  # its own memory: the others are untouched
    for msg in (second, third):
        assert torch.equal(msg.tensors["w"].payload, expected)


def _frames(declared: int, sent: int) -> list[bytes]:
    header = pb.Header(format_version=FORMAT_VERSION, kind="update", payload_size=declared)
    data = bytes(MiB)
    return [encode_header_frame(header)] + [
        encode_chunk_frame(i * MiB, [data]) for i in range(sent // MiB)
    ]


def _peak_of_a_cut_stream(frames: list[bytes]) -> int:
    """Peak memory traced while reading ``frames``, a message whose stream ends early."""
    tracemalloc.start()
    try:
        with pytest.raises(WireFormatError, match="stream ended"):
            message_from_frames(frames, LIMITS)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("sent_mib", [3, 4])
def test_payload_buffer_waits_for_a_quarter_of_the_declared_size(
    sent_mib: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header that claims 16 MiB and sends less costs nothing until 4 MiB have arrived."""
    monkeypatch.setattr(wire_message, "PAYLOAD_BUFFERS", BufferPool())
    peak = _peak_of_a_cut_stream(_frames(16 * MiB, sent_mib * MiB))
    if sent_mib < 4:
        assert peak < MiB
    else:
        assert peak >= 16 * MiB


def test_a_pooled_buffer_is_used_from_the_first_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory the pool already holds costs nothing new: no need to wait for a quarter."""
    pool = BufferPool()
    pool.take(16 * MiB)  # back in the pool at once
    monkeypatch.setattr(wire_message, "PAYLOAD_BUFFERS", pool)
    peak = _peak_of_a_cut_stream(_frames(16 * MiB, MiB))
    assert pool.reused == 1 and peak < MiB
    assert pool.free_blocks() == 1  # the failed message let go of it
