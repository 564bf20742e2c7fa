"""Checks on an untrusted ``fedq.v2.PackedTensor`` message, run before anything is allocated.

The order matters: cheap header checks (version, enums, rank, element count) come first, then the
lengths of the byte fields are compared with what the declared shape and bit map imply, and only
then are small tensors built (bit map, scales) to check their values. A hostile header
that claims a huge shape is rejected by arithmetic alone.
Every error names the tensor and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedq.codec.layout import BlockLayout, Granularity
from fedq.codec.packed import (
    FLOAT_DTYPES,
    FORMAT_VERSION,
    MAX_OUTLIER_FRACTION,
    OUTLIER_INDEX_DTYPE,
    OUTLIER_VALUE_DTYPE,
    ROW_SCALE_DTYPE,
    SCALE_DTYPES,
    Encoding,
    expected_payload_nbytes,
)
from fedq.errors import WireFormatError
from fedq.wire.limits import WireLimits
from fedq.wire.pb import tensor_pb2 as pb

DTYPE_TO_PB: dict[str, pb.DType] = {
    "float32": pb.FLOAT32,
    "float16": pb.FLOAT16,
    "bfloat16": pb.BFLOAT16,
}
DTYPE_FROM_PB: dict[pb.DType, str] = {v: k for k, v in DTYPE_TO_PB.items()}
ENCODING_TO_PB: dict[Encoding, pb.Encoding] = {
    Encoding.QUANTIZED: pb.QUANTIZED,
    Encoding.RAW: pb.RAW,
}
ENCODING_FROM_PB: dict[pb.Encoding, Encoding] = {v: k for k, v in ENCODING_TO_PB.items()}
GRANULARITY_TO_PB: dict[Granularity, pb.Granularity] = {
    Granularity.TENSOR: pb.TENSOR,
    Granularity.CHANNEL: pb.CHANNEL,
    Granularity.GROUP: pb.GROUP,
}
GRANULARITY_FROM_PB: dict[pb.Granularity, Granularity] = {
    v: k for k, v in GRANULARITY_TO_PB.items()
}

_VALID_BITS = bytes(range(1, 9))
_MAX_LABEL = 80


def label(name: str) -> str:
    """Quoted tensor name for error messages, truncated so a hostile name cannot bloat them
    (the reason travels back in gRPC trailers, which have a size limit)."""
    if len(name) > _MAX_LABEL:
        name = name[:_MAX_LABEL] + "..."
    return repr(name)


def fail(name: str, field: str, detail: str) -> WireFormatError:
    return WireFormatError(f"tensor {label(name)}: field {field!r}: {detail}")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """The validated header of a tensor message (everything but the byte fields' contents)."""

    shape: tuple[int, ...]
    numel: int
    dtype: str
    encoding: Encoding
    granularity: Granularity
    scale_dtype: str
    layout: BlockLayout | None  # None for RAW


def _enum(name: str, field: str, value: int, table: Mapping[Any, object]) -> None:
    if value not in table:
        raise fail(name, field, f"unknown or unspecified value {value}")


def _check_shape(msg: pb.PackedTensor, limits: WireLimits) -> tuple[tuple[int, ...], int]:
    name = msg.name
    if len(msg.shape) > limits.max_rank:
        raise fail(name, "shape", f"rank {len(msg.shape)} exceeds limit {limits.max_rank}")
    shape = tuple(int(d) for d in msg.shape)
    for i, d in enumerate(shape):
        if d > limits.max_elements:
            raise fail(name, "shape", f"dim {i} = {d} exceeds limit {limits.max_elements}")
    numel = math.prod(shape)
    if numel > limits.max_elements:
        raise fail(name, "shape", f"{numel} elements exceeds limit {limits.max_elements}")
    return shape, numel


def _check_empty(msg: pb.PackedTensor, fields: tuple[str, ...], why: str) -> None:
    for field in fields:
        if len(getattr(msg, field)):
            raise fail(msg.name, field, f"must be empty {why}")


def _quantized_layout(msg: pb.PackedTensor, shape: tuple[int, ...]) -> BlockLayout:
    name = msg.name
    gran = GRANULARITY_FROM_PB[msg.granularity]
    if gran is Granularity.CHANNEL and not msg.axis < len(shape):
        raise fail(name, "axis", f"value {msg.axis} out of range for rank {len(shape)}")
    if gran is Granularity.GROUP and msg.group_size <= 0:
        raise fail(name, "group_size", "must be positive for GROUP granularity")
    try:
        return BlockLayout.build(shape, gran, axis=int(msg.axis), group_size=int(msg.group_size))
    except ValueError as e:  # defensive: the checks above should make this unreachable
        raise fail(name, "granularity", str(e)) from e


def _check_block_fields(msg: pb.PackedTensor, layout: BlockLayout, scale_dtype: str) -> None:
    name, nb = msg.name, layout.num_blocks
    if len(msg.bits) != nb:
        raise fail(name, "bits", f"length {len(msg.bits)} != {nb} blocks")
    invalid = msg.bits.translate(None, _VALID_BITS)
    if invalid:
        raise fail(name, "bits", f"value {invalid[0]} out of range 1..8")
    itemsize = SCALE_DTYPES[scale_dtype].itemsize
    if len(msg.scales) != nb * itemsize:
        raise fail(name, "scales", f"length {len(msg.scales)} bytes != {nb} x {itemsize}")
    if msg.symmetric:
        _check_empty(msg, ("offsets",), "for a symmetric tensor")
    elif len(msg.offsets) != nb * itemsize:
        raise fail(name, "offsets", f"length {len(msg.offsets)} bytes != {nb} x {itemsize}")


def check_tensor(
    msg: pb.PackedTensor, limits: WireLimits, payload_nbytes: int | None = None
) -> TensorSpec:
    """Check everything that needs no allocation; returns the decoded header.
    ``payload_nbytes``: the payload's length when ``msg`` does not carry the payload (a stream
    decoder reads the header before the payload arrives)."""
    name = msg.name
    npay = len(msg.payload) if payload_nbytes is None else payload_nbytes
    if msg.format_version != FORMAT_VERSION:
        raise fail(
            name,
            "format_version",
            f"unsupported version {msg.format_version} (expected {FORMAT_VERSION})",
        )
    _enum(name, "dtype", msg.dtype, DTYPE_FROM_PB)
    _enum(name, "encoding", msg.encoding, ENCODING_FROM_PB)
    _enum(name, "granularity", msg.granularity, GRANULARITY_FROM_PB)
    scale_dtype = DTYPE_FROM_PB.get(msg.scale_dtype)
    if scale_dtype not in SCALE_DTYPES:
        raise fail(name, "scale_dtype", f"value {msg.scale_dtype} is not FLOAT32 or FLOAT16")
    shape, numel = _check_shape(msg, limits)
    encoding = ENCODING_FROM_PB[msg.encoding]
    dtype = DTYPE_FROM_PB[msg.dtype]
    layout = None
    if encoding is Encoding.RAW:
        if msg.granularity != pb.TENSOR:
            raise fail(name, "granularity", "RAW tensors must use TENSOR granularity")
        _check_empty(
            msg,
            ("bits", "scales", "offsets", "row_scales", "outlier_index", "outlier_values"),
            "for a RAW tensor",
        )
        expected = numel * FLOAT_DTYPES[dtype].itemsize
        if npay != expected:
            raise fail(name, "payload", f"length {npay} bytes != expected {expected}")
    else:
        layout = _quantized_layout(msg, shape)
        _check_block_fields(msg, layout, scale_dtype)
        if msg.row_scales:
            rows = numel // shape[-1] if shape and shape[-1] else 0
            size = ROW_SCALE_DTYPE.itemsize
            if not shape or len(msg.row_scales) != size * rows:
                raise fail(
                    name, "row_scales", f"length {len(msg.row_scales)} bytes != {rows} x {size}"
                )
        _check_outlier_sizes(msg, shape, numel)
    gran = GRANULARITY_FROM_PB[msg.granularity]
    return TensorSpec(shape, numel, dtype, encoding, gran, scale_dtype, layout)


def _check_outlier_sizes(msg: pb.PackedTensor, shape: tuple[int, ...], numel: int) -> None:
    """Outlier rows: indices and values together, whole rows, at most 1/8 of the rows."""
    name = msg.name
    if not msg.outlier_index:
        _check_empty(msg, ("outlier_values",), "without outlier_index")
        return
    isz, vsz = OUTLIER_INDEX_DTYPE.itemsize, OUTLIER_VALUE_DTYPE.itemsize
    width = shape[-1] if shape else 0
    rows = numel // width if width else 0
    k, rem = divmod(len(msg.outlier_index), isz)
    if rem or not width:
        raise fail(name, "outlier_index", f"length {len(msg.outlier_index)} bytes is not k x {isz}")
    if k > int(rows * MAX_OUTLIER_FRACTION):
        raise fail(name, "outlier_index", f"{k} outlier rows of {rows} (at most 1/8)")
    if len(msg.outlier_values) != k * width * vsz:
        raise fail(
            name,
            "outlier_values",
            f"length {len(msg.outlier_values)} bytes != {k} x {width} x {vsz}",
        )


def check_outliers(name: str, spec: TensorSpec, index: torch.Tensor, values: torch.Tensor) -> None:
    """Outlier row indices strictly increasing and inside the tensor; values finite."""
    rows = spec.numel // spec.shape[-1]
    i = index.to(torch.int64)
    if int(i.min()) < 0 or int(i.max()) >= rows:
        raise fail(name, "outlier_index", f"row index outside [0, {rows})")
    if i.numel() > 1 and not bool((i[1:] > i[:-1]).all()):
        raise fail(name, "outlier_index", "row indices must be strictly increasing")
    if not bool(torch.isfinite(values).all()):
        raise fail(name, "outlier_values", "contains NaN or Inf")


def check_payload_size(
    msg: pb.PackedTensor, spec: TensorSpec, bits: torch.Tensor, payload_nbytes: int | None = None
) -> None:
    """QUANTIZED payloads must be exactly as long as the layout and bit map imply."""
    if spec.layout is None:
        return
    npay = len(msg.payload) if payload_nbytes is None else payload_nbytes
    expected = expected_payload_nbytes(spec.layout, bits)
    if npay != expected:
        raise fail(msg.name, "payload", f"length {npay} bytes != expected {expected}")


def _finite_non_negative(name: str, field: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise fail(name, field, "contains NaN or Inf")
    if bool((t < 0).any()):
        raise fail(name, field, "contains a negative scale")


def check_row_scales(name: str, row_scales: torch.Tensor) -> None:
    """Row scales multiply decoded values: finite and non-negative."""
    _finite_non_negative(name, "row_scales", row_scales)


def check_scales(name: str, scales: torch.Tensor, offsets: torch.Tensor | None) -> None:
    """Scales must be finite and non-negative, offsets finite: a NaN here would poison the model."""
    if scales.numel():
        _finite_non_negative(name, "scales", scales)
    if offsets is not None and offsets.numel() and not bool(torch.isfinite(offsets).all()):
        raise fail(name, "offsets", "contains NaN or Inf")
