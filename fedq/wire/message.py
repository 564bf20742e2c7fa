"""``WireMessage`` and its framing: one Header frame, then Chunk frames of the serialized bundle.

Why frames: gRPC caps a message at 4 MiB by default and protobuf at 2 GiB, while model updates and
activations can be larger. Streaming 1 MiB chunks is also the fastest way to move bytes over gRPC
(docs/platform.md §4). The receiver checks the header (version, declared size against its limits)
and the chunk sequence (contiguous offsets, no overflow, exact total) and allocates the payload
buffer only once a quarter of the declared size has arrived, so a header that lies about the
payload size costs at most a few times the bytes actually sent. Frames are
built and read as their serialized bytes (:mod:`fedq.wire.frame`); the readers also take protobuf
``Frame`` messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np

from fedq.codec.packed import FORMAT_VERSION, PackedTensor
from fedq.errors import WireFormatError
from fedq.wire.buffers import PAYLOAD_BUFFERS
from fedq.wire.frame import (
    ChunkView,
    FrameLike,
    chunk_frame_nbytes,
    decode_frame,
    encode_chunk_frame,
    encode_header_frame,
    frame_bytes,
)
from fedq.wire.limits import WireLimits
from fedq.wire.pb import tensor_pb2 as pb
from fedq.wire.serde import bundle_from_bytes, bundle_pieces

#: The payload buffer is allocated once this fraction (1/n) of the declared size has arrived.
_ALLOCATE_AFTER = 4

#: Called with a message's checked header before its payload is read (see read_message).
Admit = Callable[[pb.Header], None]


class MessageKind(StrEnum):
    """What a message is: the Header's ``kind`` on the wire (docs/wire-format.md §12). A received
    Header of any other kind is refused as malformed."""

    #: server to client, the reply of ``GetTask``: the task's input (global model, client state)
    GLOBAL = "global"
    #: client to server, ``PushUpdate``: the task's result
    UPDATE = "update"
    #: client to server, ``PushUpdate`` instead of an update: the task cannot be finished (tag
    #: ``error`` says why), no tensors
    FAILED = "failed"
    #: split client to server, ``Split.Step``: the cut activations of one step
    ACTIVATIONS = "activations"
    #: split server to client, the reply on the same stream: the gradient at the cut
    GRADIENTS = "gradients"


#: Header ``kind`` strings a receiver accepts.
KINDS = frozenset(k.value for k in MessageKind)


@dataclass(slots=True, kw_only=True)
class WireMessage:
    """One logical message of the protocol: a task, an update, a failed task, activations or
    gradients. Build one with the constructor of its kind (:meth:`global_model`, :meth:`update`,
    :meth:`failed`, :meth:`activations`, :meth:`gradients`).

    ``scalars`` carry small numbers (num_samples, loss, ...), ``tags`` small strings. ``nbytes``
    is set on a received message: the serialized bytes of the frames it arrived in.
    """

    kind: MessageKind
    client_id: str
    round: int = 0
    step: int = 0
    scalars: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, PackedTensor] = field(default_factory=dict)
    nbytes: int = field(default=0, compare=False)

    @classmethod
    def global_model(
        cls,
        client_id: str,
        round: int = 0,
        tensors: dict[str, PackedTensor] | None = None,
        *,
        scalars: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
    ) -> WireMessage:
        """A task's input for ``client_id`` (federated: the global model; split: client state)."""
        return cls(
            kind=MessageKind.GLOBAL,
            client_id=client_id,
            round=round,
            scalars=scalars or {},
            tags=tags or {},
            tensors=tensors or {},
        )

    @classmethod
    def update(
        cls,
        client_id: str,
        round: int = 0,
        tensors: dict[str, PackedTensor] | None = None,
        *,
        scalars: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
    ) -> WireMessage:
        """A task's result from ``client_id`` (federated: the delta; split: the client state)."""
        return cls(
            kind=MessageKind.UPDATE,
            client_id=client_id,
            round=round,
            scalars=scalars or {},
            tags=tags or {},
            tensors=tensors or {},
        )

    @classmethod
    def failed(cls, client_id: str, round: int, error: str) -> WireMessage:
        """``client_id`` cannot finish its task of ``round``, because of ``error``."""
        return cls(kind=MessageKind.FAILED, client_id=client_id, round=round, tags={"error": error})

    @classmethod
    def activations(
        cls,
        client_id: str,
        round: int = 0,
        step: int = 0,
        tensors: dict[str, PackedTensor] | None = None,
        *,
        scalars: dict[str, float] | None = None,
    ) -> WireMessage:
        """One split step of ``client_id``: the cut activations (and mask, labels, ...)."""
        return cls(
            kind=MessageKind.ACTIVATIONS,
            client_id=client_id,
            round=round,
            step=step,
            scalars=scalars or {},
            tensors=tensors or {},
        )

    @classmethod
    def gradients(
        cls,
        client_id: str,
        round: int = 0,
        step: int = 0,
        tensors: dict[str, PackedTensor] | None = None,
        *,
        scalars: dict[str, float] | None = None,
    ) -> WireMessage:
        """The server's answer to one split step: the gradient at the cut."""
        return cls(
            kind=MessageKind.GRADIENTS,
            client_id=client_id,
            round=round,
            step=step,
            scalars=scalars or {},
            tensors=tensors or {},
        )

    def addressed_to(self, client_id: str) -> WireMessage:
        """The same message for another client (a round's task, prepared once for all)."""
        return replace(self, client_id=client_id)


def _kind(kind: str) -> MessageKind:
    if not kind:
        raise WireFormatError("header: field 'kind': must be non-empty")
    if kind not in KINDS:
        raise WireFormatError(
            f"header: field 'kind': unknown kind {kind[:40]!r} (expected one of "
            f"{', '.join(k.value for k in MessageKind)})"
        )
    return MessageKind(kind)


def _header(msg: WireMessage, payload_size: int) -> pb.Header:
    _kind(msg.kind)
    if msg.round < 0 or msg.step < 0:
        raise WireFormatError(
            f"header: field 'round'/'step': must be >= 0, got {msg.round}/{msg.step}"
        )
    bad = [k for k, v in msg.scalars.items() if not math.isfinite(v)]
    if bad:
        raise WireFormatError(f"header: field 'scalars': non-finite value for {bad[0]!r}")
    return pb.Header(
        format_version=FORMAT_VERSION,
        kind=msg.kind,
        client_id=msg.client_id,
        round=msg.round,
        step=msg.step,
        payload_size=payload_size,
        scalars=msg.scalars,
        tags=msg.tags,
    )


def message_to_frame_bytes(msg: WireMessage, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Frames of ``msg``, serialized: a Header with the payload size, then Chunks of at most
    ``chunk_size`` bytes of data, each built with one copy of its data (what the transport sends).

    A message without tensors has an empty payload and therefore no chunks. Chunks are cut lazily
    across the bundle's pieces, so the whole payload is never joined into one buffer here.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    pieces = bundle_pieces(msg.tensors) if msg.tensors else []
    total = sum(len(p) for p in pieces)
    yield encode_header_frame(_header(msg, total))
    offset = 0
    pending: list[bytes | memoryview] = []
    pending_size = 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            take = view[: chunk_size - pending_size]
            pending.append(take)
            pending_size += len(take)
            view = view[len(take) :]
            if pending_size == chunk_size:
                yield encode_chunk_frame(offset, pending)
                offset += pending_size
                pending, pending_size = [], 0
    if pending_size:
        yield encode_chunk_frame(offset, pending)


def message_to_frames(msg: WireMessage, chunk_size: int = 1 << 20) -> Iterator[pb.Frame]:
    """:func:`message_to_frame_bytes` as protobuf ``Frame`` messages."""
    for data in message_to_frame_bytes(msg, chunk_size):
        yield pb.Frame.FromString(data)


def message_nbytes(msg: WireMessage, chunk_size: int = 1 << 20) -> int:
    """The serialized bytes of ``msg``'s frames (what a byte counter adds up when it is sent),
    computed from the piece lengths without building the chunks."""
    pieces = bundle_pieces(msg.tensors) if msg.tensors else []
    total = sum(len(p) for p in pieces)
    n = len(encode_header_frame(_header(msg, total)))
    for offset in range(0, total, chunk_size):
        n += chunk_frame_nbytes(offset, min(chunk_size, total - offset))
    return n


def _check_header(header: pb.Header, limits: WireLimits) -> None:
    if header.format_version != FORMAT_VERSION:
        raise WireFormatError(
            f"header: field 'format_version': unsupported version {header.format_version} "
            f"(expected {FORMAT_VERSION})"
        )
    _kind(header.kind)
    if header.payload_size > limits.max_payload_bytes:
        raise WireFormatError(
            f"header: field 'payload_size': {header.payload_size} bytes exceeds limit "
            f"{limits.max_payload_bytes}"
        )
    for key, value in header.scalars.items():
        if not math.isfinite(value):
            raise WireFormatError(f"header: field 'scalars': non-finite value for {key[:80]!r}")


def _decode(header: pb.Header, payload: memoryview, limits: WireLimits) -> WireMessage:
    # ``payload`` is ours alone: the tensors may keep views of it rather than copies.
    tensors = bundle_from_bytes(payload, limits, share=True) if header.payload_size else {}
    return WireMessage(
        kind=MessageKind(header.kind),
        client_id=header.client_id,
        round=int(header.round),
        step=int(header.step),
        scalars=dict(header.scalars),
        tags=dict(header.tags),
        tensors=tensors,
    )


def read_message(
    frames: Iterator[FrameLike], limits: WireLimits, admit: Admit | None = None
) -> WireMessage | None:
    """Consume exactly one message's frames from ``frames`` (a stream may carry several).

    Returns None if the stream ends cleanly before a header. Stops right after the last chunk, so a
    bidirectional stream can answer before the peer sends its next message. The chunks are copied
    once, into one buffer that the message's payload tensors then share. ``admit`` is called with
    the checked header before any chunk is read (a server's memory budget: it may wait, or
    raise to refuse the message).
    """
    got = _read_header(frames, limits)
    if got is None:
        return None
    header, nbytes = got
    if admit is not None:
        admit(header)
    payload, chunk_nbytes = _reassemble(frames, header.payload_size)
    msg = _decode(header, payload, limits)
    msg.nbytes = nbytes + chunk_nbytes
    return msg


def _reassemble(frames: Iterator[FrameLike], size: int) -> tuple[memoryview, int]:
    """The ``size`` bytes of payload carried by the next chunk frames, and the frames' size.

    Each chunk is copied once (without holding the GIL), into a buffer of exactly ``size`` bytes
    from :data:`~fedq.wire.buffers.PAYLOAD_BUFFERS`, which gets it back once the decoded tensors
    are gone. The declared size is not trusted for new memory: unless the pool has a buffer that
    fits, the buffer is allocated only once 1/``_ALLOCATE_AFTER`` of the payload has arrived (the
    chunks before that are kept as received), so a header that overstates the size costs at most
    that many times the bytes the peer actually sent.
    """
    buf = PAYLOAD_BUFFERS.take_pooled(size)
    held: list[memoryview] = []
    held_size = pos = nbytes = 0
    for data, frame_size in _payload_frames(frames, size):
        nbytes += frame_size
        if buf is None:
            held.append(data)
            held_size += len(data)
            if held_size * _ALLOCATE_AFTER < size:
                continue
            buf = PAYLOAD_BUFFERS.take(size)
            for part in held:
                _copy(buf, pos, part)
                pos += len(part)
            held = []
        else:
            _copy(buf, pos, data)
            pos += len(data)
    return (buf if buf is not None else memoryview(b"")), nbytes


def _copy(dst: memoryview, pos: int, src: memoryview) -> None:
    """``dst[pos : pos + len(src)] = src``, through numpy, which lets go of the GIL meanwhile."""
    np.copyto(np.frombuffer(dst, np.uint8, len(src), pos), np.frombuffer(src, np.uint8))


def read_header(frames: Iterator[FrameLike], limits: WireLimits) -> pb.Header | None:
    """The next message's checked Header frame, or None if the stream ends cleanly first."""
    got = _read_header(frames, limits)
    return None if got is None else got[0]


def _read_header(frames: Iterator[FrameLike], limits: WireLimits) -> tuple[pb.Header, int] | None:
    """:func:`read_header` and the header frame's serialized size."""
    first = next(frames, None)
    if first is None:
        return None
    data = frame_bytes(first)
    header = decode_frame(data, "frame 0")
    if not isinstance(header, pb.Header):
        raise WireFormatError(
            "frame 0: field 'header': the first frame of a message must be a header"
        )
    _check_header(header, limits)
    return header, len(data)


def payload_chunks(frames: Iterator[FrameLike], size: int) -> Iterator[memoryview]:
    """The data of the Chunk frames that carry a payload of ``size`` bytes, in order, each
    checked (contiguous offsets, no overflow, no empty chunk) before it is yielded; each is a
    view of its frame's bytes."""
    for data, _ in _payload_frames(frames, size):
        yield data


def _payload_frames(frames: Iterator[FrameLike], size: int) -> Iterator[tuple[memoryview, int]]:
    """:func:`payload_chunks` with each chunk frame's serialized size."""
    received = 0
    index = 0
    while received < size:
        index += 1
        frame = next(frames, None)
        if frame is None:
            raise WireFormatError(
                f"frame {index}: field 'chunk': stream ended after {received} of {size} bytes"
            )
        raw = frame_bytes(frame)
        chunk = decode_frame(raw, f"frame {index}")
        if not isinstance(chunk, ChunkView):
            got = "a header" if chunk is not None else "an empty frame"
            raise WireFormatError(f"frame {index}: field 'chunk': expected a chunk, got {got}")
        if chunk.offset != received:
            raise WireFormatError(
                f"frame {index}: field 'chunk.offset': expected {received}, got {chunk.offset}"
            )
        data = chunk.data
        if len(data) > size - received:
            raise WireFormatError(
                f"frame {index}: field 'chunk.data': overflows payload_size {size} "
                f"({received} + {len(data)} bytes)"
            )
        if not data:
            raise WireFormatError(f"frame {index}: field 'chunk.data': empty chunk")
        received += len(data)
        yield data, len(raw)


def message_from_frames(
    frames: Iterable[FrameLike], limits: WireLimits, admit: Admit | None = None
) -> WireMessage:
    """Reassemble and validate one message from a complete frame stream (nothing may follow it);
    ``admit`` as in :func:`read_message`."""
    it = iter(frames)
    msg = read_message(it, limits, admit)
    if msg is None:
        raise WireFormatError("frame 0: field 'header': empty stream, no header")
    extra = next(it, None)
    if extra is not None:
        kind = decode_frame(frame_bytes(extra), "frame")
        field_name, what = (
            ("header", "header")
            if isinstance(kind, pb.Header)
            else ("chunk", "chunk" if kind is not None else "empty")
        )
        raise WireFormatError(
            f"frame: field {field_name!r}: unexpected {what} frame after the payload"
        )
    return msg
