"""Framing: a Header then contiguous Chunks; large payloads stream, hostile sequences fail."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable

import pytest
import torch

from fedq.codec import FORMAT_VERSION, quantize, raw
from fedq.errors import WireFormatError
from fedq.wire import (
    MessageKind,
    WireLimits,
    WireMessage,
    bundle_to_bytes,
    frame_nbytes,
    message_from_frames,
    message_to_frames,
    read_message,
)
from fedq.wire.pb import tensor_pb2 as pb

LIMITS = WireLimits()
MiB = 1 << 20


def _msg(**tensors: torch.Tensor) -> WireMessage:
    return WireMessage(
        kind=MessageKind.UPDATE,
        client_id="c1",
        round=3,
        step=7,
        scalars={"num_samples": 32.0, "loss": 0.25},
        tags={"strategy": "fedavg"},
        tensors={n: quantize(t, 4) if t.dim() > 1 else raw(t) for n, t in tensors.items()},
    )


def test_large_message_streams_in_bounded_chunks(assert_packed_equal) -> None:
    big = torch.randn(5 * MiB // 4)  # 5 MiB RAW float32: more than one default gRPC message
    msg = _msg(big=big, w=torch.randn(8, 16))
    frames = list(message_to_frames(msg))
    payload = bundle_to_bytes(msg.tensors)
    assert frames[0].WhichOneof("kind") == "header"
    assert frames[0].header.payload_size == len(payload) > 5 * MiB
    chunks = [f.chunk for f in frames[1:]]
    assert len(chunks) == math.ceil(len(payload) / MiB)
    assert all(len(c.data) <= MiB for c in chunks)
    assert all(frame_nbytes(f) < 4 * MiB for f in frames)
    assert b"".join(c.data for c in chunks) == payload
    back = message_from_frames(frames, LIMITS)
    assert (back.kind, back.client_id, back.round, back.step) == ("update", "c1", 3, 7)
    assert back.scalars == msg.scalars and back.tags == msg.tags
    assert list(back.tensors) == ["big", "w"]
    for name in msg.tensors:
        assert_packed_equal(msg.tensors[name], back.tensors[name])


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunks_cut_across_tensor_boundaries(chunk_size: int, assert_packed_equal) -> None:
    msg = _msg(a=torch.randn(3, 5), b=torch.randn(11), c=torch.randn(2, 9))
    frames = list(message_to_frames(msg, chunk_size=chunk_size))
    offsets = [f.chunk.offset for f in frames[1:]]
    sizes = [len(f.chunk.data) for f in frames[1:]]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    assert all(s == chunk_size for s in sizes[:-1]) and 0 < sizes[-1] <= chunk_size
    back = message_from_frames(frames, LIMITS)
    for name in msg.tensors:
        assert_packed_equal(msg.tensors[name], back.tensors[name])


def test_message_without_tensors_has_no_chunks() -> None:
    frames = list(message_to_frames(WireMessage.failed("c", 1, "no data")))
    assert len(frames) == 1 and frames[0].header.payload_size == 0
    back = message_from_frames(frames, LIMITS)
    assert back == WireMessage.failed("c", 1, "no data")


def test_read_message_consumes_one_message_per_call() -> None:
    """A bidi stream carries several messages back to back."""
    first, second = _msg(a=torch.randn(4, 4)), WireMessage.activations("c", step=2)
    it = iter([*message_to_frames(first, chunk_size=50), *message_to_frames(second)])
    m1, m2 = read_message(it, LIMITS), read_message(it, LIMITS)
    assert m1 is not None and m2 is not None
    assert set(m1.tensors) == {"a"} and m2.step == 2
    assert read_message(it, LIMITS) is None


def _frames(chunk_size: int = 40) -> list[pb.Frame]:
    return list(message_to_frames(_msg(a=torch.randn(6, 6)), chunk_size=chunk_size))


def _mutate_header(**fields: object) -> list[pb.Frame]:
    frames = _frames()
    for k, v in fields.items():
        if k == "scalars":
            frames[0].header.scalars.update(v)  # type: ignore[call-overload]
        else:
            setattr(frames[0].header, k, v)
    return frames


def _swap_chunks() -> list[pb.Frame]:
    f = _frames()
    f[1], f[2] = f[2], f[1]
    return f


def _overflow() -> list[pb.Frame]:
    f = _frames()
    f[-1].chunk.data += b"\0"
    return f


def _garbage_payload() -> list[pb.Frame]:
    f = [pb.Frame(header=pb.Header(format_version=FORMAT_VERSION, kind="update", payload_size=3))]
    return [*f, pb.Frame(chunk=pb.Chunk(offset=0, data=b"\x12\xff\x01"))]


FRAME_CORPUS: dict[str, tuple[Callable[[], list[pb.Frame]], str]] = {
    "missing header": (lambda: _frames()[1:], "header"),
    "empty stream": (lambda: [], "header"),
    "header version": (lambda: _mutate_header(format_version=9), "format_version"),
    "empty kind": (lambda: _mutate_header(kind=""), "kind"),
    "unknown kind": (lambda: _mutate_header(kind="ack"), "kind"),
    "payload over limit": (lambda: _mutate_header(payload_size=(8 << 30) + 1), "payload_size"),
    "NaN scalar": (lambda: _mutate_header(scalars={"loss": float("nan")}), "scalars"),
    "Inf scalar": (lambda: _mutate_header(scalars={"lr": float("-inf")}), "scalars"),
    "out-of-order chunks": (_swap_chunks, "chunk.offset"),
    "duplicate chunk": (lambda: [*_frames()[:2], *_frames()[1:]], "chunk.offset"),
    "chunk overflow": (_overflow, "chunk.data"),
    "extra chunk after payload": (lambda: [*_frames(), _frames()[-1]], "chunk"),
    "truncated stream": (lambda: _frames()[:-1], "chunk"),
    "second header mid-payload": (lambda: [*_frames()[:2], _frames()[0]], "chunk"),
    "second header after payload": (lambda: [*_frames(), _frames()[0]], "header"),
    "empty frame": (lambda: [_frames()[0], pb.Frame()], "chunk"),
    "garbage payload": (_garbage_payload, "tensors"),
}


@pytest.mark.parametrize("case", list(FRAME_CORPUS), ids=list(FRAME_CORPUS))
def test_malformed_frames_are_rejected_naming_the_field(case: str) -> None:
    make, field = FRAME_CORPUS[case]
    with pytest.raises(WireFormatError) as exc:
        message_from_frames(make(), LIMITS)
    assert f"'{field}'" in str(exc.value), str(exc.value)


def test_hostile_payload_size_does_not_preallocate() -> None:
    """A header claiming 7 GiB followed by 10 bytes must fail without reserving 7 GiB."""
    frames = [
        pb.Frame(
            header=pb.Header(format_version=FORMAT_VERSION, kind="update", payload_size=7 << 30)
        ),
        pb.Frame(chunk=pb.Chunk(offset=0, data=b"0123456789")),
    ]
    tracemalloc.start()
    try:
        with pytest.raises(WireFormatError, match="stream ended"):
            message_from_frames(frames, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_sender_rejects_values_the_receiver_would_reject() -> None:
    with pytest.raises(WireFormatError, match="scalars"):
        list(message_to_frames(WireMessage.update("c", scalars={"x": math.nan})))
    with pytest.raises(WireFormatError, match="kind': must be non-empty"):
        list(message_to_frames(WireMessage(kind="", client_id="c")))  # type: ignore[arg-type]
    with pytest.raises(WireFormatError, match="kind': unknown kind 'ack'"):
        list(message_to_frames(WireMessage(kind="ack", client_id="c")))  # type: ignore[arg-type]
