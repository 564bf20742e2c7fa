"""``Frame`` as bytes: the exact encoding of Chunk frames, and a strict parser for any frame.

Why bytes and not protobuf objects: a Chunk frame is nearly all payload, and every pass through a
protobuf message copies it (setting the field, serializing, parsing, reading it back). The
transport sends each frame as its serialized bytes, built with one copy of the payload, and reads
a received chunk's data as a slice of the bytes gRPC hands over. Header frames are small and go
through protobuf. The encoding is byte-identical to protobuf's for the same ``Frame``.

The parser accepts what protobuf accepts for a frame fedq could act on, and refuses more: a frame
holds at most one ``header`` or one ``chunk`` (protobuf would let a later one override or merge
into an earlier one), ``header``, ``chunk``, ``chunk.offset`` and ``chunk.data`` must have their
own wire types, and an offset must fit in 64 bits. Unknown fields are skipped, as protobuf skips
them (docs/wire-format.md §1); groups, field number 0, truncated or overlong varints and lengths
past the end are rejected. Every refusal is a :class:`~fedq.errors.WireFormatError` naming the
field.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from fedq.errors import WireFormatError
from fedq.wire.pb import tensor_pb2 as pb
from fedq.wire.protowire import WIRE_LEN, WIRE_VARINT, encode_varint, scan_fields

#: A frame as a protobuf message or as its serialized bytes; the readers take either.
FrameLike = pb.Frame | bytes

_HEADER, _CHUNK = 1, 2  # Frame fields
_OFFSET, _DATA = 1, 2  # Chunk fields
_FRAME_NAMES = {_HEADER: "header", _CHUNK: "chunk"}
_CHUNK_NAMES = {_OFFSET: "chunk.offset", _DATA: "chunk.data"}
_CHUNK_TAG = bytes([(_CHUNK << 3) | WIRE_LEN])
_OFFSET_TAG = bytes([(_OFFSET << 3) | WIRE_VARINT])
_DATA_TAG = bytes([(_DATA << 3) | WIRE_LEN])
_MAX_UINT64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A parsed Chunk frame: its offset, and its data as a slice of the frame's bytes."""

    offset: int
    data: memoryview


def chunk_frame_prefix(offset: int, size: int) -> bytes:
    """The bytes of a Chunk frame that come before its ``size`` bytes of data.

    Proto3 leaves an offset of 0 and empty data out; the frame's ``chunk`` field is always there.
    """
    if not 0 <= offset <= _MAX_UINT64:
        raise ValueError(f"chunk offset must fit in a uint64, got {offset}")
    head = _OFFSET_TAG + encode_varint(offset) if offset else b""
    if size:
        head += _DATA_TAG + encode_varint(size)
    return _CHUNK_TAG + encode_varint(len(head) + size) + head


def chunk_frame_nbytes(offset: int, size: int) -> int:
    """Serialized size of a Chunk frame with ``size`` bytes of data at ``offset``."""
    return len(chunk_frame_prefix(offset, size)) + size


def encode_chunk_frame(offset: int, parts: list[bytes | memoryview]) -> bytes:
    """The serialized ``Frame{chunk{offset, data}}`` whose data is ``parts`` joined: one copy."""
    size = sum(len(p) for p in parts)
    return b"".join([chunk_frame_prefix(offset, size), *parts])


def encode_header_frame(header: pb.Header) -> bytes:
    """The serialized ``Frame{header}`` (small: protobuf serializes it)."""
    return pb.Frame(header=header).SerializeToString()


def frame_bytes(frame: FrameLike) -> bytes:
    """``frame`` serialized (bytes are returned as they are)."""
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


def frame_nbytes(frame: FrameLike) -> int:
    """Serialized size of a frame: the unit fedq's byte counters add up."""
    return len(frame) if isinstance(frame, bytes) else int(frame.ByteSize())


def decode_frame(data: bytes | memoryview, what: str) -> pb.Header | ChunkView | None:
    """Parse one serialized frame: its Header, its Chunk (data not copied), or None for a frame
    with neither. ``what`` names the frame in errors (e.g. ``"frame 3"``)."""
    view = memoryview(data)
    header: memoryview | None = None
    chunk: memoryview | None = None
    for field, wire_type, value in scan_fields(view, what, _FRAME_NAMES):
        if field not in _FRAME_NAMES:
            continue  # unknown: skipped, as protobuf skips it
        name = _FRAME_NAMES[field]
        if wire_type != WIRE_LEN or not isinstance(value, memoryview):
            raise WireFormatError(f"{what}: field {name!r}: wrong wire type {wire_type}")
        if header is not None or chunk is not None:
            other = "header" if header is not None else "chunk"
            raise WireFormatError(
                f"{what}: field {name!r}: the frame already holds a {other} (one per frame)"
            )
        if field == _HEADER:
            header = value
        else:
            chunk = value
    if header is not None:
        try:
            return pb.Header.FromString(header)  # type: ignore[arg-type]  # upb takes buffers
        except DecodeError as e:
            raise WireFormatError(f"{what}: field 'header': corrupt: {e}") from e
    if chunk is not None:
        return _decode_chunk(chunk, what)
    return None


def _decode_chunk(body: memoryview, what: str) -> ChunkView:
    offset: int | None = None
    data: memoryview | None = None
    for field, wire_type, value in scan_fields(body, what, _CHUNK_NAMES):
        if field not in _CHUNK_NAMES:
            continue
        name = _CHUNK_NAMES[field]
        if field == _OFFSET:
            if wire_type != WIRE_VARINT or not isinstance(value, int):
                raise WireFormatError(f"{what}: field {name!r}: wrong wire type {wire_type}")
            if offset is not None:
                raise WireFormatError(f"{what}: field {name!r}: given twice")
            if value > _MAX_UINT64:
                raise WireFormatError(f"{what}: field {name!r}: {value} does not fit in 64 bits")
            offset = value
        else:
            if wire_type != WIRE_LEN or not isinstance(value, memoryview):
                raise WireFormatError(f"{what}: field {name!r}: wrong wire type {wire_type}")
            if data is not None:
                raise WireFormatError(f"{what}: field {name!r}: given twice")
            data = value
    return ChunkView(offset or 0, data if data is not None else memoryview(b""))
