"""Decoding a message's tensors while its Chunk frames arrive (instead of after the last one).

A serialized ``TensorBundle`` is the format version (field 1) and one length-delimited
``PackedTensor`` per tensor (field 2); fedq writes each tensor's fields in number order, so its
header (fields 1-13) comes first, then the payload (field 14), then row scales and outlier rows
(fields 15-17). :class:`BundleDecoder` parses the bundle as a push parser over the bytes it is
fed: as soon as a tensor's payload starts, its header is validated exactly as
:func:`~fedq.wire.serde.packed_from_proto` validates it (with the declared payload length) and a
:class:`~fedq.codec.stream.StreamDecoder` decodes the payload chunk by chunk onto the chosen
device (with the GPU kernels on a CUDA device); the fields after the payload are validated and
applied when the tensor ends. Only the small fields are buffered; payload bytes go straight to the
decoder. :func:`read_message_streaming` does this for one message of a frame stream, with the same
frame checks as :func:`~fedq.wire.message.read_message`.

Beyond what :func:`~fedq.wire.serde.bundle_from_bytes` accepts, streaming needs fedq's field
order: the format version before the first tensor, and no header field after a tensor's payload;
a bundle that breaks it is rejected with a :class:`~fedq.errors.WireFormatError` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from google.protobuf.message import DecodeError

from fedq.codec.packed import FORMAT_VERSION, PackedTensor
from fedq.codec.quantize import dequantize
from fedq.codec.stream import StreamDecoder
from fedq.errors import WireFormatError
from fedq.wire import validate
from fedq.wire.frame import FrameLike
from fedq.wire.limits import WireLimits
from fedq.wire.message import MessageKind, WireMessage, payload_chunks, read_header
from fedq.wire.pb import tensor_pb2 as pb
from fedq.wire.protowire import WIRE_I32, WIRE_I64, WIRE_LEN, WIRE_VARINT
from fedq.wire.serde import packed_from_proto, packed_header_from_proto

_VERSION, _TENSORS = 1, 2  # TensorBundle fields
_PAYLOAD = 14  # PackedTensor field
_AFTER_PAYLOAD = {15, 16, 17}  # row_scales, outlier_index, outlier_values
_MAX_HEADER = 20  # a tag and a varint take at most 10 bytes each


def _varint(data: bytearray, pos: int) -> tuple[int, int] | None:
    """``(value, next_pos)``, or None when ``data`` ends inside the varint."""
    value = 0
    for i in range(10):
        if pos + i >= len(data):
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise WireFormatError("varint longer than 10 bytes")


class _FieldReader:
    """Push parser of one message's top-level fields. Length-delimited fields in ``streamed``
    go to ``on_start(field, length)`` / ``on_data(field, bytes)`` / ``on_end(field)`` as they
    arrive; every other field is handed whole, as its raw bytes, to ``on_field(field, wire_type,
    raw)``."""

    def __init__(
        self,
        what: str,
        streamed: set[int],
        on_field: Callable[[int, int, bytes], None],
        on_start: Callable[[int, int], None],
        on_data: Callable[[int, memoryview], None],
        on_end: Callable[[int], None],
    ) -> None:
        self.what = what
        self.streamed = streamed
        self.on_field, self.on_start, self.on_data, self.on_end = (
            on_field,
            on_start,
            on_data,
            on_end,
        )
        self._head = bytearray()  # the current field's tag and value / length so far
        self._field = 0
        self._left = 0  # bytes of a length-delimited body still to come
        self._body: bytearray | None = None  # the body of a buffered field (None: streamed)

    @property
    def idle(self) -> bool:
        """Between two fields (a message may end here)."""
        return not self._head and not self._left

    def feed(self, data: memoryview) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                part = data[pos : pos + take]
                if self._body is None:
                    self.on_data(self._field, part)
                else:
                    self._body += part
                pos += take
                self._left -= take
                if not self._left:
                    self._end_body()
                continue
            self._head.append(data[pos])
            pos += 1
            self._parse_head()

    def _parse_head(self) -> None:
        head = self._head
        tag = _varint(head, 0)
        if tag is None:
            return self._check_size()
        key, pos = tag
        field, wire = key >> 3, key & 7
        if field == 0:
            raise WireFormatError(f"{self.what}: invalid field number 0")
        if wire == WIRE_VARINT:
            if _varint(head, pos) is not None:
                self._emit(field, wire)
        elif wire in (WIRE_I64, WIRE_I32):
            if len(head) - pos == (8 if wire == WIRE_I64 else 4):
                self._emit(field, wire)
        elif wire == WIRE_LEN:
            got = _varint(head, pos)
            if got is None:
                return self._check_size()
            self._field, self._left = field, got[0]
            self._body = None if field in self.streamed else bytearray()
            if self._body is None:
                self._head = bytearray()
                self.on_start(field, self._left)
            if not self._left:
                self._end_body()
        else:
            raise WireFormatError(f"{self.what}: field {field}: unsupported wire type {wire}")
        return None

    def _check_size(self) -> None:
        if len(self._head) > _MAX_HEADER:
            raise WireFormatError(f"{self.what}: malformed field header")

    def _emit(self, field: int, wire: int) -> None:
        raw = bytes(self._head)
        self._head = bytearray()
        self.on_field(field, wire, raw)

    def _end_body(self) -> None:
        if self._body is None:
            self.on_end(self._field)
            return
        raw = bytes(self._head) + bytes(self._body)
        self._head, self._body = bytearray(), None
        self.on_field(self._field, WIRE_LEN, raw)


class _TensorStream:
    """One ``PackedTensor`` field of the bundle: buffers the header fields, decodes the payload
    as it arrives, then applies the fields that follow it."""

    def __init__(self, index: int, limits: WireLimits, device: torch.device | None) -> None:
        self.index, self.limits, self.device = index, limits, device
        self.head = bytearray()
        self.tail = bytearray()
        self.payload_nbytes: int | None = None
        self.header: PackedTensor | None = None
        self.decoder: StreamDecoder | None = None
        self.reader = _FieldReader(
            f"bundle: tensor {index}",
            {_PAYLOAD},
            self._field,
            self._start,
            self._data,
            lambda f: None,
        )

    def _parse(self, raw: bytes | bytearray) -> pb.PackedTensor:
        try:
            return pb.PackedTensor.FromString(bytes(raw))
        except DecodeError as e:
            raise WireFormatError(
                f"bundle: field 'tensors': entry {self.index} is corrupt: {e}"
            ) from e

    def _field(self, field: int, wire: int, raw: bytes) -> None:
        if self.payload_nbytes is None:
            self.head += raw
            return
        if field not in _AFTER_PAYLOAD:
            raise WireFormatError(
                f"bundle: tensor {self.index}: field {field} follows the payload "
                f"(streaming needs fields in number order)"
            )
        self.tail += raw

    def _start(self, field: int, length: int) -> None:
        if self.payload_nbytes is not None:
            raise WireFormatError(f"bundle: tensor {self.index}: field 'payload' given twice")
        self.payload_nbytes = length
        msg = self._parse(self.head)
        _check_name(msg, self.index)
        _, self.header = packed_header_from_proto(msg, self.limits, length)
        self.decoder = StreamDecoder(self.header, device=self.device)

    def _data(self, field: int, data: memoryview) -> None:
        assert self.decoder is not None
        self.decoder.feed(data)

    def finish(self) -> tuple[str, torch.Tensor]:
        if not self.reader.idle:
            raise WireFormatError(f"bundle: tensor {self.index}: truncated field")
        if self.payload_nbytes is None:  # no payload field: an empty tensor
            msg = self._parse(self.head)
            _check_name(msg, self.index)
            name, p = packed_from_proto(msg, self.limits)
            return name, dequantize(p, device=self.device)
        msg = self._parse(self.head + self.tail)
        name, full = packed_header_from_proto(msg, self.limits, self.payload_nbytes)
        assert self.decoder is not None
        y = self.decoder.finish(full.row_scales, full.outlier_index, full.outlier_values)
        return name, y


def _check_name(msg: pb.PackedTensor, index: int) -> None:
    if not msg.name:
        raise WireFormatError(f"bundle: field 'name': tensor {index} has an empty name")


class BundleDecoder:
    """Decodes a serialized ``TensorBundle`` fed in pieces (any sizes, in order) into tensors on
    ``device``: :meth:`feed` the bytes, then :meth:`finish` for ``{name: tensor}``."""

    def __init__(self, limits: WireLimits, *, device: torch.device | str | None = None) -> None:
        self.limits = limits
        self.device = torch.device(device) if device is not None else None
        self.tensors: dict[str, torch.Tensor] = {}
        self.version: int | None = None
        self.received = 0
        self.current: _TensorStream | None = None
        self._count = 0
        self.reader = _FieldReader(
            "bundle", {_TENSORS}, self._field, self._start, self._data, self._end
        )

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.received += len(data)
        if self.received > self.limits.max_payload_bytes:
            raise WireFormatError(
                f"bundle: field 'payload': {self.received} bytes exceeds limit "
                f"{self.limits.max_payload_bytes}"
            )
        self.reader.feed(memoryview(data))

    def _field(self, field: int, wire: int, raw: bytes) -> None:
        if field == _VERSION:
            if wire != WIRE_VARINT:
                raise WireFormatError("bundle: field 'format_version': wrong wire type")
            self.version = pb.TensorBundle.FromString(raw).format_version
            self._check_version()
        elif field == _TENSORS:  # streamed when length-delimited: here with another wire type
            raise WireFormatError("bundle: field 'tensors': wrong wire type")
        # other fields are ignored, as bundle_from_bytes ignores them

    def _check_version(self) -> None:
        if self.version != FORMAT_VERSION:
            raise WireFormatError(
                f"bundle: field 'format_version': unsupported version {self.version} "
                f"(expected {FORMAT_VERSION})"
            )

    def _start(self, field: int, length: int) -> None:
        if self.version is None:
            raise WireFormatError(
                "bundle: field 'format_version': must come before the first tensor to stream"
            )
        self._count += 1
        if self._count > self.limits.max_tensors:
            raise WireFormatError(
                f"bundle: field 'tensors': more than {self.limits.max_tensors} tensors (limit)"
            )
        self.current = _TensorStream(self._count - 1, self.limits, self.device)

    def _data(self, field: int, data: memoryview) -> None:
        assert self.current is not None
        self.current.reader.feed(data)

    def _end(self, field: int) -> None:
        assert self.current is not None
        name, tensor = self.current.finish()
        self.current = None
        if name in self.tensors:
            raise WireFormatError(
                f"tensor {validate.label(name)}: field 'name': duplicate name in bundle"
            )
        self.tensors[name] = tensor

    def finish(self) -> dict[str, torch.Tensor]:
        """The decoded tensors, once the whole bundle has been fed."""
        if not self.reader.idle or self.current is not None:
            raise WireFormatError("bundle: truncated: the last field is incomplete")
        self._check_version()
        return self.tensors


def read_message_streaming(
    frames: Iterator[FrameLike], limits: WireLimits, *, device: torch.device | str | None = None
) -> tuple[WireMessage, dict[str, torch.Tensor]] | None:
    """:func:`~fedq.wire.message.read_message`, decoding the tensors while the chunks arrive:
    returns the message (its ``tensors`` left empty) and ``{name: decoded tensor}`` on
    ``device``, or None if the stream ends cleanly before a header."""
    header = read_header(frames, limits)
    if header is None:
        return None
    decoded: dict[str, torch.Tensor] = {}
    if header.payload_size:
        bundle = BundleDecoder(limits, device=device)
        for data in payload_chunks(frames, header.payload_size):
            bundle.feed(data)
        decoded = bundle.finish()
    msg = WireMessage(
        kind=MessageKind(header.kind),
        client_id=header.client_id,
        round=int(header.round),
        step=int(header.step),
        scalars=dict(header.scalars),
        tags=dict(header.tags),
    )
    return msg, decoded
