"""A minimal scanner for the top level of a protobuf message (varints and length-delimited fields).

Why hand-scan instead of ``TensorBundle.FromString``: protobuf refuses messages over 2 GiB, but a
bundle is only a sequence of ``tensors`` fields, so scanning its top level lets fedq decode bundles
of any size one tensor at a time (each tensor still parsed by protobuf), and lets the decoder count
tensors and check the format version before parsing any of them, and lets it take a tensor's
payload out of its message as a slice instead of a copy. The scanner only slices the input (no
copies) and bounds-checks every length it reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from fedq.errors import WireFormatError

WIRE_VARINT = 0
WIRE_I64 = 1
WIRE_LEN = 2
WIRE_I32 = 5


def read_varint(data: memoryview, pos: int, what: str, field: str) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns ``(value, next_pos)``."""
    value = 0
    for i in range(10):
        if pos + i >= len(data):
            raise WireFormatError(f"{what}: field {field}: truncated varint at byte {pos}")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise WireFormatError(f"{what}: field {field}: varint longer than 10 bytes at byte {pos}")


def encode_varint(value: int) -> bytes:
    """Encode a non-negative int as a base-128 varint."""
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_len_field(field: int, size: int) -> bytes:
    """Tag and length prefix of a length-delimited field whose body has ``size`` bytes."""
    return encode_varint((field << 3) | WIRE_LEN) + encode_varint(size)


def scan_fields(
    data: memoryview, what: str, names: Mapping[int, str]
) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field_number, wire_type, value)`` for each top-level field of a serialized message.

    ``value`` is an int for varints and fixed-width fields and a zero-copy slice for
    length-delimited fields; ``names`` maps field numbers to names for errors. Groups (wire
    types 3 and 4) and out-of-bounds lengths raise :class:`WireFormatError`.
    """
    for field, wire_type, value, _, _ in _scan(data, what, names):
        yield field, wire_type, value


def split_len_field(
    data: memoryview, field: int, what: str, names: Mapping[int, str]
) -> tuple[bytearray, memoryview | None]:
    """Take one length-delimited field out of a serialized message without copying its value.

    Returns the message's other fields, byte for byte and in order (a valid message without that
    field), and a slice of the field's last occurrence (protobuf keeps the last one), or None. An
    occurrence with another wire type stays in the rest, where protobuf treats it as it would have.
    """
    rest = bytearray()
    value: memoryview | None = None
    kept = 0
    for number, wire_type, v, start, end in _scan(data, what, names):
        if number == field and wire_type == WIRE_LEN:
            assert isinstance(v, memoryview)
            rest += data[kept:start]
            kept, value = end, v
    rest += data[kept:]
    return rest, value


def _scan(
    data: memoryview, what: str, names: Mapping[int, str]
) -> Iterator[tuple[int, int, int | memoryview, int, int]]:
    """:func:`scan_fields` plus where each field's encoding starts (its tag) and ends."""
    pos = 0
    end = len(data)
    while pos < end:
        start = pos
        key, pos = read_varint(data, pos, what, "'tag'")
        field, wire_type = key >> 3, key & 7
        label = repr(names.get(field, str(field)))
        if field == 0:
            raise WireFormatError(f"{what}: invalid field number 0 at byte {pos}")
        if wire_type == WIRE_VARINT:
            value, pos = read_varint(data, pos, what, label)
            yield field, wire_type, value, start, pos
        elif wire_type == WIRE_LEN:
            size, pos = read_varint(data, pos, what, label)
            if size > end - pos:
                raise WireFormatError(
                    f"{what}: field {label}: claims {size} bytes but only {end - pos} remain"
                )
            yield field, wire_type, data[pos : pos + size], start, pos + size
            pos += size
        elif wire_type in (WIRE_I64, WIRE_I32):
            width = 8 if wire_type == WIRE_I64 else 4
            if width > end - pos:
                raise WireFormatError(f"{what}: field {label}: truncated fixed-width value")
            yield (
                field,
                wire_type,
                int.from_bytes(data[pos : pos + width], "little"),
                start,
                pos + width,
            )
            pos += width
        else:
            raise WireFormatError(f"{what}: field {label}: unsupported wire type {wire_type}")
