"""``PackedTensor`` <-> protobuf, and bundles of named tensors <-> bytes (Flower-style serde pairs).

Decoding treats every message as hostile: each field is checked against the format and against
:class:`~fedq.wire.limits.WireLimits` *before* any tensor is allocated (see
:mod:`fedq.wire.validate`), and every failure is a :class:`~fedq.errors.WireFormatError` naming the
tensor and the field. Scales and offsets travel as little-endian arrays of ``scale_dtype``; the
payload is the codec's packed bytes, decoded into a CPU uint8 tensor with a single copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

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
from fedq.wire.protowire import WIRE_LEN, WIRE_VARINT, encode_len_field, scan_fields

_BUNDLE_VERSION_FIELD = 1
_BUNDLE_TENSORS_FIELD = 2
_BUNDLE_FIELD_NAMES = {_BUNDLE_VERSION_FIELD: "format_version", _BUNDLE_TENSORS_FIELD: "tensors"}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements as little-endian bytes (host is little-endian, see codec.bitpack)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def _tensor_from_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """One copy into a fresh, writable CPU tensor (``torch.frombuffer`` rejects empty buffers)."""
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def packed_to_proto(p: PackedTensor, name: str) -> pb.PackedTensor:
    """Encode ``p`` as a ``fedq.v1.PackedTensor`` message named ``name``."""
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
    return pb.PackedTensor(
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
        payload=_tensor_bytes(p.payload.to(torch.uint8)),
        row_scales=_opt_bytes(p.row_scales, ROW_SCALE_DTYPE),
        outlier_index=_opt_bytes(p.outlier_index, OUTLIER_INDEX_DTYPE),
        outlier_values=_opt_bytes(p.outlier_values, OUTLIER_VALUE_DTYPE),
    )


def _opt_bytes(t: torch.Tensor | None, dtype: torch.dtype) -> bytes:
    return b"" if t is None else _tensor_bytes(t.to(dtype))


def packed_from_proto(msg: pb.PackedTensor, limits: WireLimits) -> tuple[str, PackedTensor]:
    """Validate and decode one ``fedq.v1.PackedTensor``; returns ``(name, tensor)``."""
    name, header = packed_header_from_proto(msg, limits)
    return name, dataclasses.replace(header, payload=_tensor_from_bytes(msg.payload, torch.uint8))


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


def bundle_pieces(tensors: Mapping[str, PackedTensor]) -> list[bytes]:
    """A serialized ``TensorBundle`` as a list of pieces whose concatenation is the bundle.

    Each tensor is serialized on its own (tag, length, body), which is byte-identical to serializing
    the whole bundle at once but never builds one protobuf message larger than a single tensor, so
    bundles over protobuf's 2 GiB message cap still encode. Callers that stream can chunk across the
    pieces without joining them.
    """
    pieces = [pb.TensorBundle(format_version=FORMAT_VERSION).SerializeToString()]
    for name, p in tensors.items():
        if not name:
            raise WireFormatError("bundle: field 'name': tensor names must be non-empty")
        body = packed_to_proto(p, name).SerializeToString()
        pieces.append(encode_len_field(_BUNDLE_TENSORS_FIELD, len(body)))
        pieces.append(body)
    return pieces


def bundle_to_bytes(tensors: Mapping[str, PackedTensor]) -> bytes:
    """Serialize named tensors as one ``fedq.v1.TensorBundle``."""
    return b"".join(bundle_pieces(tensors))


def bundle_from_bytes(
    data: bytes | bytearray | memoryview, limits: WireLimits
) -> dict[str, PackedTensor]:
    """Validate and decode a serialized ``TensorBundle`` into ``{name: PackedTensor}``.

    The top level is scanned first (version, tensor count) so that nothing is parsed or
    allocated for a bundle that is going to be rejected anyway.
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
        try:
            msg = pb.PackedTensor.FromString(span)  # type: ignore[arg-type]  # upb takes buffers
        except DecodeError as e:
            raise WireFormatError(f"bundle: field 'tensors': entry {index} is corrupt: {e}") from e
        if not msg.name:
            raise WireFormatError(f"bundle: field 'name': tensor {index} has an empty name")
        if msg.name in out:
            raise WireFormatError(
                f"tensor {validate.label(msg.name)}: field 'name': duplicate name in bundle"
            )
        name, tensor = packed_from_proto(msg, limits)
        out[name] = tensor
    return out
