"""``PackedTensor`` <-> protobuf, and bundles of named tensors <-> bytes (Flower-style serde pairs).

Decoding treats every message as hostile: each field is checked against the format and against
:class:`~fedq.wire.limits.WireLimits` *before* any tensor is allocated (see
:mod:`fedq.wire.validate`), and every failure is a :class:`~fedq.errors.WireFormatError` naming the
tensor and the field. Scales and offsets travel as little-endian arrays of ``scale_dtype``; the
payload is the codec's packed bytes. Payloads are the bulk of every message, so they are never
copied on the way out (the serialized pieces are views of the tensors) and at most once on the way
in (a reassembled message's tensors can share its buffer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from google.protobuf.message import DecodeError

from fedq.codec.layout import Granularity
from fedq.codec.packed import (
    FORMAT_VERSION,
    OUTLIER_INDEX_DTYPE,
    OUTLIER_VALUE_DTYPE,
    ROW_SCALE_DTYPE,
    SCALE_DTYPES,
    Encoding,
    PackedTensor,
)
from fedq.errors import WireFormatError
from fedq.wire import validate
from fedq.wire.limits import WireLimits
from fedq.wire.pb import tensor_pb2 as pb
from fedq.wire.protowire import (
    WIRE_LEN,
    WIRE_VARINT,
    encode_len_field,
    scan_fields,
    split_len_field,
)

_BUNDLE_VERSION_FIELD = 1
_BUNDLE_TENSORS_FIELD = 2
_BUNDLE_FIELD_NAMES = {_BUNDLE_VERSION_FIELD: "format_version", _BUNDLE_TENSORS_FIELD: "tensors"}
_PAYLOAD_FIELD = pb.PackedTensor.DESCRIPTOR.fields_by_name["payload"].number
_TENSOR_FIELD_NAMES = {f.number: f.name for f in pb.PackedTensor.DESCRIPTOR.fields}
#: Fields numbered after ``payload``: serialized after it, as protobuf orders fields by number.
_AFTER_PAYLOAD = tuple(
    f.name for f in pb.PackedTensor.DESCRIPTOR.fields if f.number > _PAYLOAD_FIELD
)

#: A serialized message in pieces: small fields as bytes, tensor payloads as views of the tensors.
Pieces = list[bytes | memoryview]


def _tensor_view(t: torch.Tensor) -> memoryview:
    """The tensor's elements as little-endian bytes (host is little-endian, see codec.bitpack);
    a view of the tensor's memory when it is already a contiguous CPU tensor."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return _tensor_view(t).tobytes()


def _tensor_from_bytes(data: bytes | memoryview, dtype: torch.dtype) -> torch.Tensor:
    """One copy into a fresh, writable CPU tensor (``torch.frombuffer`` rejects empty buffers)."""
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _proto_fields(p: PackedTensor, name: str) -> dict[str, Any]:
    """Every field of ``p``'s message except ``payload``."""
    sdt = SCALE_DTYPES.get(p.scale_dtype)
    if sdt is None or p.scales.dtype != sdt:
        raise WireFormatError(
            f"tensor {name!r}: cannot encode scales of dtype {p.scales.dtype} "
            f"as scale_dtype {p.scale_dtype!r}"
        )
    if p.offsets is not None and p.offsets.dtype != sdt:
        raise WireFormatError(
            f"tensor {name!r}: cannot encode offsets of dtype {p.offsets.dtype} "
            f"as scale_dtype {p.scale_dtype!r}"
        )
    axis = p.axis
    if p.granularity is Granularity.CHANNEL and axis < 0 and p.shape:
        axis %= len(p.shape)
    return dict(
        format_version=p.version,
        name=name,
        shape=list(p.shape),
        dtype=validate.DTYPE_TO_PB[p.dtype],
        encoding=validate.ENCODING_TO_PB[p.encoding],
        granularity=validate.GRANULARITY_TO_PB[p.granularity],
        axis=axis,
        group_size=p.group_size,
        symmetric=p.symmetric,
        scale_dtype=validate.DTYPE_TO_PB[p.scale_dtype],
        bits=_tensor_bytes(p.bits.to(torch.uint8)),
        scales=_tensor_bytes(p.scales),
        offsets=b"" if p.offsets is None else _tensor_bytes(p.offsets),
        row_scales=_opt_bytes(p.row_scales, ROW_SCALE_DTYPE),
        outlier_index=_opt_bytes(p.outlier_index, OUTLIER_INDEX_DTYPE),
        outlier_values=_opt_bytes(p.outlier_values, OUTLIER_VALUE_DTYPE),
    )


def packed_to_proto(p: PackedTensor, name: str) -> pb.PackedTensor:
    """Encode ``p`` as a ``fedq.v2.PackedTensor`` message named ``name``."""
    return pb.PackedTensor(
        **_proto_fields(p, name), payload=_tensor_bytes(p.payload.to(torch.uint8))
    )


def _packed_pieces(p: PackedTensor, name: str) -> Pieces:
    """``packed_to_proto(p, name).SerializeToString()`` in pieces, the payload as a view of ``p``.

    Protobuf writes fields in field-number order, so the fields before ``payload``, the payload
    field and the fields after it, serialized separately, concatenate to the same bytes.
    """
    fields = _proto_fields(p, name)
    after = {k: fields.pop(k) for k in _AFTER_PAYLOAD}
    payload = _tensor_view(p.payload.to(torch.uint8))
    pieces: Pieces = [pb.PackedTensor(**fields).SerializeToString()]
    if len(payload):  # proto3 leaves empty bytes fields out
        pieces += [encode_len_field(_PAYLOAD_FIELD, len(payload)), payload]
    pieces.append(pb.PackedTensor(**after).SerializeToString())
    return pieces


def _opt_bytes(t: torch.Tensor | None, dtype: torch.dtype) -> bytes:
    return b"" if t is None else _tensor_bytes(t.to(dtype))


def packed_from_proto(msg: pb.PackedTensor, limits: WireLimits) -> tuple[str, PackedTensor]:
    """Validate and decode one ``fedq.v2.PackedTensor``; returns ``(name, tensor)``."""
    return _decode_tensor(msg, memoryview(msg.payload), limits, share=False)


def _payload_tensor(data: memoryview, share: bool) -> torch.Tensor:
    if share and len(data) and not data.readonly:
        return torch.frombuffer(data, dtype=torch.uint8)  # a view: no copy
    return _tensor_from_bytes(data, torch.uint8)


def _decode_tensor(
    msg: pb.PackedTensor, payload: memoryview, limits: WireLimits, share: bool
) -> tuple[str, PackedTensor]:
    """Decode ``msg`` whose payload is ``payload`` (carried outside the message, see
    :func:`_parse_entry`); with ``share`` the payload tensor is a view of that buffer."""
    name, header = packed_header_from_proto(msg, limits, len(payload))
    return name, dataclasses.replace(header, payload=_payload_tensor(payload, share))


def packed_header_from_proto(
    msg: pb.PackedTensor, limits: WireLimits, payload_nbytes: int | None = None
) -> tuple[str, PackedTensor]:
    """:func:`packed_from_proto` without the payload (an empty tensor in its place): every
    check, with ``payload_nbytes`` as the payload's length when ``msg`` does not carry it (a
    stream decoder validates a tensor's header before its payload arrives)."""
    spec = validate.check_tensor(msg, limits, payload_nbytes)
    bits = _tensor_from_bytes(msg.bits, torch.uint8)
    validate.check_payload_size(msg, spec, bits, payload_nbytes)
    sdt = SCALE_DTYPES[spec.scale_dtype]
    scales = _tensor_from_bytes(msg.scales, sdt)
    offsets = (
        None
        if msg.symmetric or spec.encoding is Encoding.RAW
        else (_tensor_from_bytes(msg.offsets, sdt))
    )
    validate.check_scales(msg.name, scales, offsets)
    row_scales = None
    if msg.row_scales:
        row_scales = _tensor_from_bytes(msg.row_scales, ROW_SCALE_DTYPE)
        validate.check_row_scales(msg.name, row_scales)
    outlier_index = outlier_values = None
    if msg.outlier_index:
        outlier_index = _tensor_from_bytes(msg.outlier_index, OUTLIER_INDEX_DTYPE)
        outlier_values = _tensor_from_bytes(msg.outlier_values, OUTLIER_VALUE_DTYPE)
        validate.check_outliers(msg.name, spec, outlier_index, outlier_values)
    tensor = PackedTensor(
        shape=spec.shape,
        dtype=spec.dtype,
        encoding=spec.encoding,
        granularity=spec.granularity,
        axis=int(msg.axis),
        group_size=int(msg.group_size),
        symmetric=bool(msg.symmetric),
        scale_dtype=spec.scale_dtype,
        bits=bits,
        scales=scales,
        offsets=offsets,
        payload=torch.empty(0, dtype=torch.uint8),
        row_scales=row_scales,
        outlier_index=outlier_index,
        outlier_values=None if outlier_values is None else outlier_values.view(-1, spec.shape[-1]),
        version=int(msg.format_version),
    )
    return msg.name, tensor


def bundle_pieces(tensors: Mapping[str, PackedTensor]) -> Pieces:
    """A serialized ``TensorBundle`` as a list of pieces whose concatenation is the bundle.

    Each tensor is serialized on its own (tag, length, body), which is byte-identical to serializing
    the whole bundle at once but never builds one protobuf message larger than a single tensor, so
    bundles over protobuf's 2 GiB message cap still encode. Payloads are views of the tensors'
    memory, not copies: the tensors must not be changed in place while the pieces are in use.
    Callers that stream can chunk across the pieces without joining them.
    """
    pieces: Pieces = [pb.TensorBundle(format_version=FORMAT_VERSION).SerializeToString()]
    for name, p in tensors.items():
        if not name:
            raise WireFormatError("bundle: field 'name': tensor names must be non-empty")
        body = _packed_pieces(p, name)
        pieces.append(encode_len_field(_BUNDLE_TENSORS_FIELD, sum(len(b) for b in body)))
        pieces += body
    return pieces


def bundle_to_bytes(tensors: Mapping[str, PackedTensor]) -> bytes:
    """Serialize named tensors as one ``fedq.v2.TensorBundle``."""
    return b"".join(bundle_pieces(tensors))


def _parse_entry(span: memoryview, index: int) -> tuple[pb.PackedTensor, memoryview]:
    """Parse one bundle entry with its payload left a slice of ``span`` (protobuf would copy it,
    and its getter would copy it again)."""
    rest: memoryview | bytearray = span
    payload = None
    try:
        rest, payload = split_len_field(span, _PAYLOAD_FIELD, "tensor", _TENSOR_FIELD_NAMES)
    except WireFormatError:
        rest = span  # malformed: protobuf parses it as a whole and says what is wrong
    try:
        msg = pb.PackedTensor.FromString(rest)  # type: ignore[arg-type]  # upb takes buffers
    except DecodeError as e:
        raise WireFormatError(f"bundle: field 'tensors': entry {index} is corrupt: {e}") from e
    return msg, memoryview(msg.payload) if payload is None else payload


def bundle_from_bytes(
    data: bytes | bytearray | memoryview, limits: WireLimits, *, share: bool = False
) -> dict[str, PackedTensor]:
    """Validate and decode a serialized ``TensorBundle`` into ``{name: PackedTensor}``.

    The top level is scanned first (version, tensor count) so that nothing is parsed or
    allocated for a bundle that is going to be rejected anyway. With ``share``, payload tensors
    are views of ``data`` (when it is writable) instead of copies: for a buffer the caller hands
    over and never changes again, such as a message just reassembled from its chunks.
    """
    view = memoryview(data)
    if len(view) > limits.max_payload_bytes:
        raise WireFormatError(
            f"bundle: field 'payload': {len(view)} bytes exceeds limit {limits.max_payload_bytes}"
        )
    version = 0
    spans: list[memoryview] = []
    for field, wire_type, value in scan_fields(view, "bundle", _BUNDLE_FIELD_NAMES):
        if field == _BUNDLE_VERSION_FIELD:
            if wire_type != WIRE_VARINT or not isinstance(value, int):
                raise WireFormatError("bundle: field 'format_version': wrong wire type")
            version = value
        elif field == _BUNDLE_TENSORS_FIELD:
            if wire_type != WIRE_LEN or not isinstance(value, memoryview):
                raise WireFormatError("bundle: field 'tensors': wrong wire type")
            spans.append(value)
            if len(spans) > limits.max_tensors:
                raise WireFormatError(
                    f"bundle: field 'tensors': more than {limits.max_tensors} tensors (limit)"
                )
    if version != FORMAT_VERSION:
        raise WireFormatError(
            f"bundle: field 'format_version': unsupported version {version} "
            f"(expected {FORMAT_VERSION})"
        )
    out: dict[str, PackedTensor] = {}
    for index, span in enumerate(spans):
        msg, payload = _parse_entry(span, index)
        if not msg.name:
            raise WireFormatError(f"bundle: field 'name': tensor {index} has an empty name")
        if msg.name in out:
            raise WireFormatError(
                f"tensor {validate.label(msg.name)}: field 'name': duplicate name in bundle"
            )
        name, tensor = _decode_tensor(msg, payload, limits, share)
        out[name] = tensor
    return out
