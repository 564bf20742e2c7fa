"""An independent decoder of fedq's wire format, written from docs/wire-format.md alone.

It uses numpy and the generated protobuf message classes (``fedq.wire.pb.tensor_pb2``) for parsing,
and nothing else of fedq: no codec, no serde, no validation code. Section numbers (§) refer to
docs/wire-format.md. If this decoder and fedq ever disagree on a golden vector, either the
specification or the implementation is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from fedq.wire.pb import tensor_pb2 as pb

VERSION = 3
FLOAT32, FLOAT16, BFLOAT16 = 1, 2, 3
QUANTIZED, RAW = 1, 2
TENSOR, CHANNEL, GROUP = 1, 2, 3
ITEMSIZE = {FLOAT32: 4, FLOAT16: 2, BFLOAT16: 2}
DTYPE_NAMES = {FLOAT32: "float32", FLOAT16: "float16", BFLOAT16: "bfloat16"}


class SpecError(ValueError):
    """The input breaks a rule of the specification."""


@dataclass(frozen=True)
class Limits:
    """The receiver limits of §10 (fedq's defaults)."""

    max_elements: int = 2**31
    max_tensors: int = 10_000
    max_rank: int = 8
    max_payload_bytes: int = 8 << 30


@dataclass(frozen=True)
class Decoded:
    """A decoded tensor: its dtype name, shape and little-endian element bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass
class Message:
    kind: str
    client_id: str
    round: int
    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tensors: list[Decoded] = field(default_factory=list)


# -- number formats (§1) ---------------------------------------------------------------------


def f32_to_bf16_bits(v: np.ndarray) -> np.ndarray:
    """Round binary32 values to bfloat16 (RNE; overflow to infinity), as uint16 bit patterns."""
    bits = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(v)
    out = rounded.astype(np.uint16)
    out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaNs quiet NaNs
    return out


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def read_floats(data: bytes, dtype: int) -> np.ndarray:
    """Little-endian elements of ``dtype`` widened (exactly) to binary32."""
    if dtype == FLOAT32:
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if dtype == FLOAT16:
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    return bf16_bits_to_f32(np.frombuffer(data, dtype="<u2"))


def to_dtype_bytes(v: np.ndarray, dtype: int) -> bytes:
    """``cvt_dtype`` of binary32 values (RNE), as little-endian bytes."""
    v = v.astype(np.float32)
    if dtype == FLOAT32:
        return v.astype("<f4").tobytes()
    if dtype == FLOAT16:
        with np.errstate(over="ignore"):
            return v.astype("<f2").tobytes()
    return f32_to_bf16_bits(v).astype("<u2").tobytes()


def in_dtype(v: np.ndarray, dtype: int) -> np.ndarray:
    """``f32(cvt_dtype(v))``: binary32 values rounded to ``dtype`` and widened back."""
    return read_floats(to_dtype_bytes(v, dtype), dtype)


# -- blocks (§7) and payload (§8) --------------------------------------------------------------


def block_positions(shape: tuple[int, ...], gran: int, axis: int, group: int) -> list[np.ndarray]:
    """For each block, the flat row-major positions of its elements, in block order."""
    n = math.prod(shape)
    if n == 0:
        return []
    flat = np.arange(n, dtype=np.int64)
    if gran == TENSOR:
        return [flat]
    if gran == CHANNEL:
        moved = np.moveaxis(flat.reshape(shape), axis, 0).reshape(shape[axis], -1)
        return list(moved)
    return [flat[k : k + group] for k in range(0, n, group)]


def unpack_run(data: bytes, b: int, n: int) -> np.ndarray:
    """``n`` codes of ``b`` bits, LSB-first (code i at stream bits [i*b, (i+1)*b))."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    bits = stream[: n * b].reshape(n, b).astype(np.int64)
    return bits @ (1 << np.arange(b, dtype=np.int64))


def payload_length(lengths: list[int], widths: bytes) -> int:
    total = 0
    for b in range(1, 9):
        n_b = sum(n for n, w in zip(lengths, widths, strict=True) if w == b)
        total += (n_b * b + 7) // 8
    return total


# -- one tensor (§6, §9, §10) -------------------------------------------------------------------


def _fail(name: str, field: str, why: str) -> SpecError:
    return SpecError(f"tensor {name[:80]!r}: field {field!r}: {why}")


def _check_header(t: pb.PackedTensor, limits: Limits) -> tuple[tuple[int, ...], int]:
    name = t.name
    if t.format_version != VERSION:
        raise _fail(name, "format_version", f"{t.format_version} is not {VERSION}")
    if t.dtype not in ITEMSIZE:
        raise _fail(name, "dtype", f"invalid value {t.dtype}")
    if t.encoding not in (QUANTIZED, RAW):
        raise _fail(name, "encoding", f"invalid value {t.encoding}")
    if t.granularity not in (TENSOR, CHANNEL, GROUP):
        raise _fail(name, "granularity", f"invalid value {t.granularity}")
    if t.scale_dtype not in (FLOAT32, FLOAT16):
        raise _fail(name, "scale_dtype", "must be FLOAT32 or FLOAT16")
    shape = tuple(int(d) for d in t.shape)
    if len(shape) > limits.max_rank or any(d > limits.max_elements for d in shape):
        raise _fail(name, "shape", "rank or dimension over the limit")
    numel = math.prod(shape)
    if numel > limits.max_elements:
        raise _fail(name, "shape", "too many elements")
    return shape, numel


def _require_empty(t: pb.PackedTensor, names: Iterable[str], why: str) -> None:
    for f in names:
        if len(getattr(t, f)):
            raise _fail(t.name, f, f"must be empty {why}")


def decode_tensor(t: pb.PackedTensor, limits: Limits | None = None) -> Decoded:
    """Check ``t`` against §10 and decode it (§6, §9)."""
    limits = limits or Limits()
    shape, numel = _check_header(t, limits)
    name, dtype = t.name, t.dtype
    if t.encoding == RAW:
        if t.granularity != TENSOR:
            raise _fail(name, "granularity", "RAW needs TENSOR")
        _require_empty(
            t,
            ("bits", "scales", "offsets", "row_scales", "outlier_index", "outlier_values"),
            "for RAW",
        )
        if len(t.payload) != numel * ITEMSIZE[dtype]:
            raise _fail(name, "payload", "wrong length")
        return Decoded(name, DTYPE_NAMES[dtype], shape, bytes(t.payload))

    if t.granularity == CHANNEL and not t.axis < len(shape):
        raise _fail(name, "axis", "out of range")
    if t.granularity == GROUP and t.group_size == 0:
        raise _fail(name, "group_size", "must be > 0")
    blocks = block_positions(shape, t.granularity, t.axis, t.group_size)
    nb = len(blocks)
    widths = bytes(t.bits)
    if len(widths) != nb or any(not 1 <= w <= 8 for w in widths):
        raise _fail(name, "bits", "one width 1..8 per block")
    size = ITEMSIZE[t.scale_dtype]
    if len(t.scales) != nb * size:
        raise _fail(name, "scales", "one per block")
    if t.symmetric:
        _require_empty(t, ("offsets",), "when symmetric")
    elif len(t.offsets) != nb * size:
        raise _fail(name, "offsets", "one per block")
    width = shape[-1] if shape else 0
    rows = numel // width if width else 0
    if len(t.row_scales) and (not shape or len(t.row_scales) != 2 * rows):
        raise _fail(name, "row_scales", "one float16 per row")
    k = 0
    if len(t.outlier_index):
        k, rem = divmod(len(t.outlier_index), 4)
        if rem or not width or k > rows // 8:
            raise _fail(name, "outlier_index", "k int32 indices, k <= rows / 8")
        if len(t.outlier_values) != k * width * 2:
            raise _fail(name, "outlier_values", "k rows of float16")
    else:
        _require_empty(t, ("outlier_values",), "without outlier_index")
    lengths = [len(p) for p in blocks]
    if len(t.payload) != payload_length(lengths, widths):
        raise _fail(name, "payload", "wrong length")
    scales = read_floats(t.scales, t.scale_dtype)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise _fail(name, "scales", "finite and >= 0")
    offsets = None if t.symmetric else read_floats(t.offsets, t.scale_dtype)
    if offsets is not None and not np.all(np.isfinite(offsets)):
        raise _fail(name, "offsets", "finite")
    row_scales = read_floats(t.row_scales, FLOAT16) if len(t.row_scales) else None
    if row_scales is not None and (not np.all(np.isfinite(row_scales)) or np.any(row_scales < 0)):
        raise _fail(name, "row_scales", "finite and >= 0")
    index = np.frombuffer(t.outlier_index, dtype="<i4").astype(np.int64)
    values = read_floats(t.outlier_values, FLOAT16).reshape(k, width) if k else None
    if k and (index.min() < 0 or index.max() >= rows or np.any(np.diff(index) <= 0)):
        raise _fail(name, "outlier_index", "in [0, rows), strictly increasing")
    if values is not None and not np.all(np.isfinite(values)):
        raise _fail(name, "outlier_values", "finite")

    # §8: one run per width present, ascending; blocks in order within a run; byte-aligned runs
    codes: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * nb
    pos = 0
    for b in range(1, 9):
        members = [j for j in range(nb) if widths[j] == b]
        n_b = sum(lengths[j] for j in members)
        nbytes = (n_b * b + 7) // 8
        run = unpack_run(t.payload[pos : pos + nbytes], b, n_b)
        pos += nbytes
        start = 0
        for j in members:
            codes[j] = run[start : start + lengths[j]]
            start += lengths[j]

    # §9.1: binary32 arithmetic per block, then conversion to the tensor's dtype
    v = np.zeros(numel, dtype=np.float32)
    for j in range(nb):
        q = codes[j].astype(np.float32)
        s = scales[j]
        if t.symmetric:
            centre = np.float32((2 ** widths[j] - 1) / 2)
            v[blocks[j]] = (q - centre) * s
        else:
            assert offsets is not None
            v[blocks[j]] = (q * s) + offsets[j]  # two roundings: no fused multiply-add
    y = in_dtype(v, dtype)
    # §9.3 row scales, then §9.4 outlier rows
    if row_scales is not None:
        y = in_dtype((y.reshape(rows, width) * row_scales[:, None]).reshape(-1), dtype)
    if values is not None:
        y = y.reshape(rows, width)
        y[index] = in_dtype(values.reshape(-1), dtype).reshape(k, width)
        y = y.reshape(-1)
    return Decoded(name, DTYPE_NAMES[dtype], shape, to_dtype_bytes(y, dtype))


# -- the bundle (§5) and frames (§4) ------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(10):
        if pos + i >= len(data):
            raise SpecError("bundle: truncated varint")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise SpecError("bundle: varint longer than 10 bytes")


def scan_bundle(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Top-level fields of a serialized message: ``(field, wire type, value)``."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise SpecError("bundle: field number 0")
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(data, pos)
            if size > len(data) - pos:
                raise SpecError("bundle: length past the end")
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if width > len(data) - pos:
                raise SpecError("bundle: truncated fixed-width field")
            yield number, wire, int.from_bytes(data[pos : pos + width], "little")
            pos += width
        else:
            raise SpecError(f"bundle: unsupported wire type {wire}")


def decode_bundle(data: bytes, limits: Limits | None = None) -> list[Decoded]:
    """Decode a serialized TensorBundle one tensor at a time (§5)."""
    limits = limits or Limits()
    if len(data) > limits.max_payload_bytes:
        raise SpecError("bundle: over max_payload_bytes")
    version, bodies = 0, []
    for number, wire, value in scan_bundle(data):
        if number == 1:
            if wire != 0:
                raise SpecError("bundle: format_version has the wrong wire type")
            assert isinstance(value, int)
            version = value
        elif number == 2:
            if wire != 2:
                raise SpecError("bundle: tensors has the wrong wire type")
            bodies.append(value)
            if len(bodies) > limits.max_tensors:
                raise SpecError("bundle: too many tensors")
    if version != VERSION:
        raise SpecError(f"bundle: format_version {version} is not {VERSION}")
    out, names = [], set()
    for body in bodies:
        t = pb.PackedTensor.FromString(body)
        if not t.name or t.name in names:
            raise SpecError("bundle: tensor names must be non-empty and unique")
        names.add(t.name)
        out.append(decode_tensor(t, limits))
    return out


def decode_frames(frames: Iterable[bytes], limits: Limits | None = None) -> Message:
    """Reassemble exactly one message from serialized Frames (§4) and decode it."""
    limits = limits or Limits()
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise SpecError("frames: no header")
    frame = pb.Frame.FromString(first)
    if frame.WhichOneof("kind") != "header":
        raise SpecError("frames: the first frame must be a header")
    h = frame.header
    if h.format_version != VERSION or not h.kind:
        raise SpecError("header: version 3 and a non-empty kind required")
    if h.payload_size > limits.max_payload_bytes:
        raise SpecError("header: payload_size over the limit")
    if not all(math.isfinite(v) for v in h.scalars.values()):
        raise SpecError("header: non-finite scalar")
    payload = bytearray()
    while len(payload) < h.payload_size:
        raw = next(it, None)
        if raw is None:
            raise SpecError("frames: stream ended inside the payload")
        chunk_frame = pb.Frame.FromString(raw)
        if chunk_frame.WhichOneof("kind") != "chunk":
            raise SpecError("frames: expected a chunk")
        c = chunk_frame.chunk
        if c.offset != len(payload) or not c.data or len(c.data) > h.payload_size - len(payload):
            raise SpecError("frames: chunk offset or size out of sequence")
        payload += c.data
    if next(it, None) is not None:
        raise SpecError("frames: a frame follows the payload")
    tensors = decode_bundle(bytes(payload), limits) if h.payload_size else []
    return Message(
        h.kind, h.client_id, int(h.round), int(h.step), dict(h.scalars), dict(h.tags), tensors
    )
