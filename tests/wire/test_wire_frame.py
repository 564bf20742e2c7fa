"""Frames as bytes: the encoder is byte-identical to protobuf, the parser reads chunk data without
copying it and refuses hostile frames naming the field."""

from __future__ import annotations

import pytest
import torch

from fedq.codec import FORMAT_VERSION, quantize, raw
from fedq.errors import WireFormatError
from fedq.wire import (
    WireLimits,
    WireMessage,
    bundle_to_bytes,
    frame_nbytes,
    message_from_frames,
    message_to_frame_bytes,
    message_to_frames,
)
from fedq.wire.frame import (
    ChunkView,
    chunk_frame_nbytes,
    decode_frame,
    encode_chunk_frame,
    encode_header_frame,
)
from fedq.wire.message import message_nbytes
from fedq.wire.pb import tensor_pb2 as pb
from fedq.wire.protowire import encode_varint

LIMITS = WireLimits()
OFFSETS = [0, 1, 127, 128, 300, 1 << 20, (1 << 32) + 5, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
SIZES = [0, 1, 127, 128, 16_384, 1 << 20]


def _pb_chunk(offset: int, data: bytes) -> bytes:
    return pb.Frame(chunk=pb.Chunk(offset=offset, data=data)).SerializeToString()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_chunk_frames_are_protobufs_bytes(offset: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    expected = _pb_chunk(offset, data)
    parts = [memoryview(data)[: size // 3], data[size // 3 :]]  # any split into parts
    assert encode_chunk_frame(offset, parts) == expected
    assert encode_chunk_frame(offset, [data]) == expected
    assert chunk_frame_nbytes(offset, size) == len(expected)
    assert pb.Frame.FromString(expected).ByteSize() == len(expected)
    back = decode_frame(expected, "frame 1")
    assert isinstance(back, ChunkView) and (back.offset, bytes(back.data)) == (offset, data)


def test_chunk_offset_must_fit_a_uint64() -> None:
    with pytest.raises(ValueError, match="uint64"):
        encode_chunk_frame(1 << 64, [b"x"])
    with pytest.raises(ValueError, match="uint64"):
        encode_chunk_frame(-1, [b"x"])


def test_header_frames_round_trip_through_protobuf() -> None:
    header = pb.Header(
        format_version=FORMAT_VERSION,
        kind="update",
        client_id="c",
        round=2,
        payload_size=10,
        scalars={"loss": 0.5},
        tags={"a": "b"},
    )
    data = encode_header_frame(header)
    assert data == pb.Frame(header=header).SerializeToString()
    assert decode_frame(data, "frame 0") == header
    assert decode_frame(b"", "frame 0") is None  # an empty frame: neither kind


def _message() -> WireMessage:
    gen = torch.Generator().manual_seed(5)
    return WireMessage.update(
        "c1",
        4,
        tensors={
            "w": quantize(torch.randn(40, 16, generator=gen), 3),
            "b": raw(torch.randn(33, generator=gen)),
        },
        scalars={"n": 3.0},
        tags={"s": "fedavg"},
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 1 << 20])
def test_message_frames_equal_protobufs_frames(chunk_size: int) -> None:
    """Built independently: a protobuf Header frame, then protobuf Chunk frames of the bundle."""
    msg = _message()
    payload = bundle_to_bytes(msg.tensors)
    header = pb.Header(
        format_version=FORMAT_VERSION,
        kind="update",
        client_id="c1",
        round=4,
        payload_size=len(payload),
        scalars={"n": 3.0},
        tags={"s": "fedavg"},
    )
    expected = [pb.Frame(header=header).SerializeToString()] + [
        _pb_chunk(i, payload[i : i + chunk_size]) for i in range(0, len(payload), chunk_size)
    ]
    frames = list(message_to_frame_bytes(msg, chunk_size))
    assert frames == expected
    assert [f.SerializeToString() for f in message_to_frames(msg, chunk_size)] == expected
    # Byte counting: a frame's length is its ByteSize(), and message_nbytes adds them up.
    assert [frame_nbytes(f) for f in frames] == [pb.Frame.FromString(f).ByteSize() for f in frames]
    assert message_nbytes(msg, chunk_size) == sum(map(len, frames))
    back = message_from_frames(frames, LIMITS)
    assert back.nbytes == sum(map(len, frames))
    assert bytes(bundle_to_bytes(back.tensors)) == payload


def test_message_without_tensors_is_one_header_frame() -> None:
    frames = list(message_to_frame_bytes(WireMessage.failed("c", 0, "no data")))
    assert len(frames) == 1
    assert pb.Frame.FromString(frames[0]).header.payload_size == 0


def test_chunk_data_is_a_view_of_the_frame() -> None:
    frame = _pb_chunk(9, b"abcdef")
    chunk = decode_frame(frame, "frame 1")
    assert isinstance(chunk, ChunkView)
    assert chunk.data.obj is frame and bytes(chunk.data) == b"abcdef"


def _chunk_body(body: bytes) -> bytes:
    return b"\x12" + encode_varint(len(body)) + body


HEADER = encode_header_frame(pb.Header(format_version=FORMAT_VERSION, kind="x", payload_size=1))
CHUNK = _pb_chunk(0, b"z")
UINT64_OVER = encode_varint(1 << 64)

HOSTILE: dict[str, tuple[bytes, str]] = {
    "truncated tag": (b"\x92", "tag"),
    "truncated length": (b"\x12\x85", "chunk"),
    "length past the end": (b"\x12\x05\x08\x01", "chunk"),
    "varint over 10 bytes": (b"\x12" + b"\xff" * 10 + b"\x01", "chunk"),
    "header then chunk": (HEADER + CHUNK, "chunk"),
    "chunk then header": (CHUNK + HEADER, "header"),
    "two chunks": (CHUNK + CHUNK, "chunk"),
    "two headers": (HEADER + HEADER, "header"),
    "header as a varint": (b"\x08\x01", "header"),
    "chunk as fixed32": (b"\x15\x00\x00\x00\x00", "chunk"),
    "chunk as fixed64": (b"\x11" + bytes(8), "chunk"),
    "group at the top level": (b"\x1b\x1c", "3"),
    "wire type 6": (b"\x1e", "3"),
    "wire type 7": (b"\x17", "chunk"),
    "offset as bytes": (_chunk_body(b"\x0a\x01\x00"), "chunk.offset"),
    "data as a varint": (_chunk_body(b"\x10\x05"), "chunk.data"),
    "offset twice": (_chunk_body(b"\x08\x01\x08\x01\x12\x01z"), "chunk.offset"),
    "data twice": (_chunk_body(b"\x12\x01z\x12\x01z"), "chunk.data"),
    "offset over 64 bits": (_chunk_body(b"\x08" + UINT64_OVER + b"\x12\x01z"), "chunk.offset"),
    "data past the chunk": (_chunk_body(b"\x12\x05ab"), "chunk.data"),
    "truncated offset": (_chunk_body(b"\x08\x80"), "chunk.offset"),
    "group in a chunk": (_chunk_body(b"\x1b"), "3"),
    "corrupt header": (b"\x0a\x03\x12\x05a", "header"),
    "header with bad utf-8": (b"\x0a\x03\x12\x01\xff", "header"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_frames_are_rejected_naming_the_field(case: str) -> None:
    data, field = HOSTILE[case]
    with pytest.raises(WireFormatError) as exc:
        decode_frame(data, "frame 3")
    assert str(exc.value).startswith("frame 3: ") and f"'{field}'" in str(exc.value), exc.value


def test_field_number_zero_is_rejected() -> None:
    with pytest.raises(WireFormatError, match="field number 0"):
        decode_frame(b"\x02\x00", "frame 1")
    with pytest.raises(WireFormatError, match="field number 0"):
        decode_frame(_chunk_body(b"\x00"), "frame 1")


def test_unknown_fields_are_skipped_as_protobuf_skips_them() -> None:
    """Decision (docs/wire-format.md §1, §4): unknown field numbers with a valid wire type are
    ignored in Frames and Chunks, as protobuf ignores them; groups are refused."""
    unknown = b"\x18\x07" + b"\x22\x02ab" + b"\x29" + bytes(8) + b"\x35" + bytes(4)
    frame = unknown + _chunk_body(b"\x08\x05" + unknown + b"\x12\x02hi" + unknown) + unknown
    parsed = pb.Frame.FromString(frame).chunk
    assert (parsed.offset, parsed.data) == (5, b"hi")
    chunk = decode_frame(frame, "frame 1")
    assert isinstance(chunk, ChunkView) and (chunk.offset, bytes(chunk.data)) == (5, b"hi")
    assert decode_frame(unknown, "frame 1") is None  # still an empty frame
    assert decode_frame(HEADER + unknown, "frame 0") == pb.Frame.FromString(HEADER).header


def test_explicit_zero_offset_and_empty_chunk_parse_like_protobuf() -> None:
    chunk = decode_frame(_chunk_body(b"\x08\x00\x12\x01z"), "frame 1")
    assert isinstance(chunk, ChunkView) and (chunk.offset, bytes(chunk.data)) == (0, b"z")
    empty = decode_frame(b"\x12\x00", "frame 1")
    assert isinstance(empty, ChunkView) and (empty.offset, bytes(empty.data)) == (0, b"")


def _header_bytes(size: int) -> bytes:
    return encode_header_frame(
        pb.Header(format_version=FORMAT_VERSION, kind="update", payload_size=size)
    )


STREAMS: dict[str, tuple[list[bytes], str]] = {
    "garbage first frame": ([b"\xff"], "tag"),
    "two kinds in the first frame": ([HEADER + CHUNK], "chunk"),
    "garbage chunk frame": ([_header_bytes(1), b"\x12\x09"], "chunk"),
    "chunk frame with two chunks": ([_header_bytes(1), CHUNK + CHUNK], "chunk"),
    "empty chunk": ([_header_bytes(1), b"\x12\x00"], "chunk.data"),
}


def test_garbage_after_the_payload_is_rejected() -> None:
    frames = [*message_to_frame_bytes(_message()), b"\x12\x09"]
    with pytest.raises(WireFormatError, match="'chunk'"):
        message_from_frames(frames, LIMITS)
    with pytest.raises(WireFormatError, match="'header': unexpected header frame"):
        message_from_frames([*frames[:-1], frames[0]], LIMITS)


@pytest.mark.parametrize("case", list(STREAMS), ids=list(STREAMS))
def test_hostile_frame_bytes_in_a_stream(case: str) -> None:
    frames, field = STREAMS[case]
    with pytest.raises(WireFormatError) as exc:
        message_from_frames(frames, LIMITS)
    assert f"'{field}'" in str(exc.value), exc.value
