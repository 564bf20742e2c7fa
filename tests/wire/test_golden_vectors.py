"""Golden wire vectors: fedq's decoder, fedq's encoder and an independent reference decoder written
from docs/wire-format.md must all agree with the checked-in bytes and values, bit for bit."""

from __future__ import annotations

import ast
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import golden_vectors as gv
import numpy as np
import pytest
import reference_decoder as ref
import torch

from fedq.codec import Granularity, QuantSpec, dequantize, pack_bits, quantize
from fedq.errors import WireFormatError
from fedq.wire import WireLimits, bundle_from_bytes, message_from_frames, packed_from_proto
from fedq.wire.pb import tensor_pb2 as pb

LIMITS = WireLimits()
MANIFEST = gv.load_manifest()
VECTORS = {v["name"]: v for v in MANIFEST["vectors"]}
BUNDLES = [n for n, v in VECTORS.items() if v["form"] == "bundle"]
FRAMES = [n for n, v in VECTORS.items() if v["form"] == "frames"]
ENCODED = [n for n, v in VECTORS.items() if v["encoder"]]


def _frames(vector: dict[str, Any]) -> list[bytes]:
    return gv.split_frames(gv.vector_bytes(vector))


def _packed_tensors(vector: dict[str, Any]) -> list[pb.PackedTensor]:
    """The PackedTensor messages of a vector, in bundle order (bundles and framed payloads)."""
    if vector["form"] == "bundle":
        data = gv.vector_bytes(vector)
    else:
        parsed = [pb.Frame.FromString(f) for f in _frames(vector)]
        data = b"".join(f.chunk.data for f in parsed[1:])
    return [pb.PackedTensor.FromString(v) for n, _, v in ref.scan_bundle(data) if n == 2]


def test_manifest_lists_every_file_and_stays_small() -> None:
    files = {p.name for p in gv.GOLDEN_DIR.iterdir()}
    listed = {v["file"] for v in VECTORS.values()} | {gv.MANIFEST.name}
    assert files == listed
    assert sum((gv.GOLDEN_DIR / f).stat().st_size for f in files) < 100_000
    assert MANIFEST["format_version"] == 3


@pytest.mark.parametrize("name", BUNDLES)
def test_fedq_decodes_bundle_bit_exactly(name: str) -> None:
    vector = VECTORS[name]
    tensors = bundle_from_bytes(gv.vector_bytes(vector), LIMITS)
    assert list(tensors) == [t["name"] for t in vector["tensors"]]
    for t in vector["tensors"]:
        assert gv.tensor_to_json(dequantize(tensors[t["name"]])) == t["decoded"], t["name"]


@pytest.mark.parametrize("name", FRAMES)
def test_fedq_decodes_framed_message_bit_exactly(name: str) -> None:
    vector = VECTORS[name]
    frames = [pb.Frame.FromString(f) for f in _frames(vector)]
    assert frames[0].WhichOneof("kind") == "header"
    chunks = frames[1:]
    assert all(f.WhichOneof("kind") == "chunk" for f in chunks)
    assert all(len(f.chunk.data) <= vector["chunk_size"] for f in chunks)
    if vector["tensors"]:
        assert len(chunks) >= 3  # several chunks, the last one partial
    else:
        assert not chunks and frames[0].header.payload_size == 0
    msg = message_from_frames(frames, LIMITS)
    m = vector["message"]
    assert (msg.kind, msg.client_id, msg.round, msg.step) == (
        m["kind"],
        m["client_id"],
        m["round"],
        m["step"],
    )
    assert msg.scalars == m["scalars"] and msg.tags == m["tags"]
    assert list(msg.tensors) == [t["name"] for t in vector["tensors"]]
    for t in vector["tensors"]:
        assert gv.tensor_to_json(dequantize(msg.tensors[t["name"]])) == t["decoded"]


@pytest.mark.parametrize("name", ENCODED)
def test_encoding_the_inputs_reproduces_the_bytes(name: str) -> None:
    vector = VECTORS[name]
    if vector["form"] == "bundle":
        assert gv.encode_bundle(vector) == gv.vector_bytes(vector)
    else:
        assert gv.join_frames(gv.encode_frames(vector)) == gv.vector_bytes(vector)


@pytest.mark.parametrize("name", list(VECTORS))
def test_reference_decoder_is_bit_exact(name: str) -> None:
    vector = VECTORS[name]
    if vector["form"] == "bundle":
        decoded = ref.decode_bundle(gv.vector_bytes(vector))
    else:
        msg = ref.decode_frames(_frames(vector))
        m = vector["message"]
        assert (msg.kind, msg.client_id, msg.round, msg.step) == (
            m["kind"],
            m["client_id"],
            m["round"],
            m["step"],
        )
        assert msg.scalars == m["scalars"] and msg.tags == m["tags"]
        decoded = msg.tensors
    assert [d.name for d in decoded] == [t["name"] for t in vector["tensors"]]
    for d, t in zip(decoded, vector["tensors"], strict=True):
        got = {"dtype": d.dtype, "shape": list(d.shape), "hex": d.data.hex()}
        assert got == t["decoded"], t["name"]


def test_decode_only_vector_holds_the_analytic_values() -> None:
    """The rounding rules of wire-format §9, spelled out (the manifest could not hide a change)."""
    vector = VECTORS["decode_arithmetic"]
    values = {
        t["name"]: gv.tensor_from_json(t["decoded"]).float().reshape(-1).tolist()
        for t in vector["tensors"]
    }
    assert values["bf16_ties"] == [1.0, 1.0, 1 + 2**-7, 1 + 2**-6]
    assert values["fp16_ties"] == [1.0, 1.0, 1 + 2**-10, 1 + 2**-9]
    assert values["fp32_no_fma"] == [0.0, -1.0]
    assert [math.copysign(1, v) for v in values["sym_zero_scale"]] == [-1, -1, 1, 1]
    assert values["fp16_overflow"] == [math.inf, 0.0]
    assert values["row_scale_tie"] == [1.0, 0.333251953125, 3.0, 4.5]
    assert values["bf16_outlier_round"][6:8] == [1.0, 1 + 2**-6]


def _features(t: pb.PackedTensor) -> set[str]:
    f = {f"dtype:{t.dtype}", f"encoding:{t.encoding}"}
    if t.encoding == pb.RAW:
        return f | ({"empty"} if not t.payload else set())
    rank = len(t.shape)
    f |= {f"granularity:{t.granularity}", f"scale_dtype:{t.scale_dtype}"}
    f.add("symmetric" if t.symmetric else "asymmetric")
    f |= {f"width:{b}" for b in t.bits}
    if len(set(t.bits)) > 1:
        f.add("mixed")
        if set(t.bits) & {3, 5, 6, 7}:
            f.add("mixed_straddling")
    if t.granularity == pb.CHANNEL:
        f.add("axis:" + ("first" if t.axis == 0 else "last" if t.axis == rank - 1 else "middle"))
    numel = math.prod(t.shape)
    if t.granularity == pb.GROUP and numel % t.group_size:
        f.add("partial_group")
    if t.row_scales:
        f.add("row_scales")
    if t.outlier_index:
        f.add("outliers")
    if numel == 0:
        f.add("empty")
    if rank == 0:
        f.add("0-d")
    return f


def test_golden_vectors_cover_every_wire_feature() -> None:
    covered: set[str] = set()
    for vector in VECTORS.values():
        tensors = _packed_tensors(vector)
        for t in tensors:
            covered |= _features(t)
        if len(tensors) >= 3:
            covered.add("multi_tensor")
        if vector["form"] == "frames":
            covered.add("frames:with_payload" if tensors else "frames:header_only")
        if any(t["encode"] and t["encode"].get("seed") is not None for t in vector["tensors"]):
            covered.add("stochastic")
    required = (
        {f"dtype:{d}" for d in (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)}
        | {f"encoding:{e}" for e in (pb.RAW, pb.QUANTIZED)}
        | {f"granularity:{g}" for g in (pb.TENSOR, pb.CHANNEL, pb.GROUP)}
        | {f"scale_dtype:{s}" for s in (pb.FLOAT32, pb.FLOAT16)}
        | {f"width:{b}" for b in range(1, 9)}
        | {"axis:first", "axis:middle", "axis:last", "symmetric", "asymmetric", "mixed"}
        | {"mixed_straddling", "partial_group", "row_scales", "outliers", "empty", "0-d"}
        | {"multi_tensor", "frames:with_payload", "frames:header_only", "stochastic"}
    )
    assert required <= covered, sorted(required - covered)


def test_reference_decoder_uses_no_fedq_code_but_the_protobuf_classes() -> None:
    tree = ast.parse(Path(ref.__file__).read_text(encoding="utf-8"))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
    fedq = {m for m in modules if m.split(".")[0] == "fedq"}
    assert fedq == {"fedq.wire.pb"}, fedq
    assert modules - fedq <= {"__future__", "math", "collections.abc", "dataclasses", "numpy"}


def test_worked_examples_of_the_specification() -> None:
    """The two payload examples of wire-format §8, through fedq's packer and the reference."""
    codes = torch.tensor([5, 3, 7, 1], dtype=torch.uint8)
    assert bytes(pack_bits(codes, 3).tolist()) == bytes([0xDD, 0x03])
    assert ref.unpack_run(bytes([0xDD, 0x03]), 3, 4).tolist() == [5, 3, 7, 1]
    x = torch.tensor([0.0, 7.0, 1.0, 0.0, 2.0, 9.0])  # codes [0, 7], [1, 0], [0, 7]
    spec = QuantSpec(granularity=Granularity.GROUP, group_size=2)
    p = quantize(x, torch.tensor([3, 1, 3], dtype=torch.uint8), spec)
    assert bytes(p.payload.tolist()) == bytes([0x01, 0x38, 0x0E])


# -- both decoders reject exactly what the specification forbids ---------------------------------


def _one(vector: str, name: str) -> pb.PackedTensor:
    return next(t for t in _packed_tensors(VECTORS[vector]) if t.name == name)


def _set(field: str, value: Any) -> Callable[[pb.PackedTensor], None]:
    def apply(t: pb.PackedTensor) -> None:
        setattr(t, field, value)

    return apply


def _f16(*xs: float) -> bytes:
    return torch.tensor(xs, dtype=torch.float16).numpy().tobytes()


def _i32(*xs: int) -> bytes:
    return torch.tensor(xs, dtype=torch.int32).numpy().tobytes()


def _shape(dims: list[int]) -> Callable[[pb.PackedTensor], None]:
    def apply(t: pb.PackedTensor) -> None:
        del t.shape[:]
        t.shape.extend(dims)

    return apply


#: (case, field, vector, tensor, mutation): each mutation breaks one rule of wire-format §10;
#: both decoders must reject it naming that field.
REJECTED: list[tuple[str, str, str, str, Callable[[pb.PackedTensor], None]]] = [
    ("version_2", "format_version", "channel_axis0", "w", _set("format_version", 2)),
    ("dtype_unset", "dtype", "channel_axis0", "w", _set("dtype", 0)),
    ("encoding_unset", "encoding", "channel_axis0", "w", _set("encoding", 0)),
    ("granularity_unset", "granularity", "channel_axis0", "w", _set("granularity", 0)),
    ("scale_dtype_unset", "scale_dtype", "channel_axis0", "w", _set("scale_dtype", 0)),
    ("scale_dtype_bf16", "scale_dtype", "channel_axis0", "w", _set("scale_dtype", pb.BFLOAT16)),
    ("rank_9", "shape", "raw_fp16", "w", _shape([1] * 8 + [5])),
    ("too_many_elements", "shape", "raw_fp16", "w", _shape([2**16, 2**16])),
    ("width_0", "bits", "channel_axis0", "w", _set("bits", b"\x04\x00\x04\x04")),
    ("width_9", "bits", "channel_axis0", "w", _set("bits", b"\x04\x09\x04\x04")),
    ("bits_short", "bits", "channel_axis0", "w", _set("bits", b"\x04\x04\x04")),
    ("scales_short", "scales", "channel_axis0", "w", _set("scales", _f16(1, 1, 1))),
    ("scale_negative", "scales", "channel_axis0", "w", _set("scales", _f16(1, -1, 1, 1))),
    ("scale_nan", "scales", "channel_axis0", "w", _set("scales", _f16(1, math.nan, 1, 1))),
    ("offset_inf", "offsets", "channel_axis0", "w", _set("offsets", _f16(0, 0, math.inf, 0))),
    ("offsets_when_symmetric", "offsets", "channel_axis0", "w", _set("symmetric", True)),
    ("offsets_missing", "offsets", "channel_axis_middle", "w", _set("symmetric", False)),
    (
        "payload_short",
        "payload",
        "channel_axis0",
        "w",
        lambda t: setattr(t, "payload", t.payload[:-1]),
    ),
    (
        "payload_long",
        "payload",
        "channel_axis0",
        "w",
        lambda t: setattr(t, "payload", t.payload + b"\0"),
    ),
    ("axis_out_of_range", "axis", "channel_axis0", "w", _set("axis", 2)),
    ("group_size_0", "group_size", "group_partial", "w", _set("group_size", 0)),
    ("channel_on_0d", "axis", "empty_and_scalar", "scalar", _set("granularity", pb.CHANNEL)),
    ("raw_channel", "granularity", "raw_fp16", "w", _set("granularity", pb.CHANNEL)),
    ("raw_scale_dtype_unset", "scale_dtype", "raw_fp16", "w", _set("scale_dtype", 0)),
    (
        "raw_payload_short",
        "payload",
        "raw_fp16",
        "w",
        lambda t: setattr(t, "payload", t.payload[:-2]),
    ),
    ("raw_with_bits", "bits", "raw_fp16", "w", _set("bits", b"\x04")),
    ("raw_with_row_scales", "row_scales", "raw_fp16", "w", _set("row_scales", _f16(1.0))),
    (
        "row_scales_short",
        "row_scales",
        "row_scales_fp16",
        "w",
        lambda t: setattr(t, "row_scales", t.row_scales[:-2]),
    ),
    (
        "row_scale_negative",
        "row_scales",
        "row_scales_fp16",
        "w",
        _set("row_scales", _f16(*[-1.0] * 16)),
    ),
    ("row_scales_on_0d", "row_scales", "empty_and_scalar", "scalar", _set("row_scales", _f16(1.0))),
    (
        "outliers_decreasing",
        "outlier_index",
        "outliers_fp32_capped",
        "h",
        _set("outlier_index", _i32(17, 0, 20)),
    ),
    (
        "outliers_repeated",
        "outlier_index",
        "outliers_fp32_capped",
        "h",
        _set("outlier_index", _i32(0, 17, 17)),
    ),
    (
        "outlier_out_of_range",
        "outlier_index",
        "outliers_fp32_capped",
        "h",
        _set("outlier_index", _i32(0, 17, 24)),
    ),
    (
        "outlier_negative",
        "outlier_index",
        "outliers_fp32_capped",
        "h",
        _set("outlier_index", _i32(-1, 17, 20)),
    ),
    (
        "outliers_over_an_eighth",
        "outlier_index",
        "outliers_fp32_capped",
        "h",
        lambda t: (
            setattr(t, "outlier_index", _i32(0, 5, 17, 20)),
            setattr(t, "outlier_values", t.outlier_values + _f16(*[1.0] * 8)),
        ),
    ),
    (
        "outlier_values_short",
        "outlier_values",
        "outliers_fp32_capped",
        "h",
        lambda t: setattr(t, "outlier_values", t.outlier_values[:-2]),
    ),
    (
        "outlier_values_alone",
        "outlier_values",
        "channel_axis0",
        "w",
        _set("outlier_values", _f16(*[1.0] * 16)),
    ),
    (
        "outlier_value_nan",
        "outlier_values",
        "outliers_bf16_row_scales",
        "h",
        lambda t: setattr(t, "outlier_values", _f16(math.nan) + t.outlier_values[2:]),
    ),
    (
        "outliers_with_few_rows",
        "outlier_index",
        "tensor_asym_fp16_scales",
        "w",
        lambda t: (
            setattr(t, "outlier_index", _i32(0)),
            setattr(t, "outlier_values", _f16(*[1] * 5)),
        ),
    ),
]

#: Changes the specification says a receiver ignores: both decoders accept them unchanged.
ACCEPTED: list[tuple[str, str, str, Callable[[pb.PackedTensor], None]]] = [
    ("unknown_field", "channel_axis0", "w", lambda t: t.MergeFromString(b"\xa0\x06\x05")),
    (
        "tensor_ignores_axis_and_group",
        "tensor_asym_fp16_scales",
        "w",
        lambda t: (setattr(t, "axis", 5), setattr(t, "group_size", 3)),
    ),
    ("group_ignores_axis", "group_partial", "w", _set("axis", 9)),
    ("channel_ignores_group_size", "channel_axis0", "w", _set("group_size", 7)),
    (
        "raw_ignores_symmetric_axis",
        "raw_bf16",
        "w",
        lambda t: (setattr(t, "symmetric", True), setattr(t, "axis", 3)),
    ),
    ("unpacked_shape", "channel_axis0", "w", lambda t: None),
]


def _mutated(vector: str, name: str, mutate: Callable[[pb.PackedTensor], None]) -> pb.PackedTensor:
    t = pb.PackedTensor()
    t.CopyFrom(_one(vector, name))
    mutate(t)
    return t


@pytest.mark.parametrize(
    ("case", "field", "vector", "name", "mutate"), REJECTED, ids=[c[0] for c in REJECTED]
)
def test_both_decoders_reject_what_the_spec_forbids(
    case: str, field: str, vector: str, name: str, mutate: Callable[[pb.PackedTensor], None]
) -> None:
    t = _mutated(vector, name, mutate)
    named = f"field {field!r}"
    with pytest.raises(WireFormatError, match=named):
        packed_from_proto(t, LIMITS)
    with pytest.raises(ref.SpecError, match=named):
        ref.decode_tensor(t)


@pytest.mark.parametrize(
    ("case", "vector", "name", "mutate"), ACCEPTED, ids=[c[0] for c in ACCEPTED]
)
def test_both_decoders_accept_what_the_spec_ignores(
    case: str, vector: str, name: str, mutate: Callable[[pb.PackedTensor], None]
) -> None:
    t = _mutated(vector, name, mutate)
    data = t.SerializeToString()
    if case == "unpacked_shape":  # shape as one varint field per dimension instead of packed
        t2 = pb.PackedTensor()
        t2.CopyFrom(t)
        del t2.shape[:]
        dims = b"".join(b"\x18" + bytes([d]) for d in t.shape)  # every dim here is < 128
        data = t2.SerializeToString() + dims
    parsed = pb.PackedTensor.FromString(data)
    expected = next(x for x in VECTORS[vector]["tensors"] if x["name"] == name)["decoded"]
    _, p = packed_from_proto(parsed, LIMITS)
    assert gv.tensor_to_json(dequantize(p)) == expected
    d = ref.decode_tensor(parsed)
    assert {"dtype": d.dtype, "shape": list(d.shape), "hex": d.data.hex()} == expected


def _bundle(*bodies: bytes, version: bytes = b"\x08\x03") -> bytes:
    return version + b"".join(b"\x12" + bytes([len(b)]) + b for b in bodies)


@pytest.mark.parametrize("case", ["no_version", "version_2", "duplicate_name", "empty_name"])
def test_both_decoders_reject_bad_bundles(case: str) -> None:
    body = _one("raw_fp16", "w").SerializeToString()
    nameless = _mutated("raw_fp16", "w", _set("name", "")).SerializeToString()
    data = {
        "no_version": _bundle(body, version=b""),
        "version_2": _bundle(body, version=b"\x08\x02"),
        "duplicate_name": _bundle(body, body),
        "empty_name": _bundle(nameless),
    }[case]
    with pytest.raises(WireFormatError):
        bundle_from_bytes(data, LIMITS)
    with pytest.raises(ref.SpecError):
        ref.decode_bundle(data)


def _chunk(offset: int, data: bytes) -> bytes:
    return pb.Frame(chunk=pb.Chunk(offset=offset, data=data)).SerializeToString()


@pytest.mark.parametrize("case", ["gap", "empty_chunk", "overflow", "trailing", "no_header"])
def test_both_decoders_reject_bad_frame_sequences(case: str) -> None:
    frames = _frames(VECTORS["framed_global"])
    header, chunks = frames[0], frames[1:]
    size = pb.Frame.FromString(header).header.payload_size
    first = len(pb.Frame.FromString(chunks[0]).chunk.data)
    bad = {
        "gap": [header, chunks[0], *chunks[2:]],
        "empty_chunk": [header, chunks[0], _chunk(first, b""), *chunks[1:]],
        "overflow": [*frames[:-1], _chunk(size - 1, b"\0\0")],
        "trailing": [*frames, _chunk(size, b"\0")],
        "no_header": chunks,
    }[case]
    with pytest.raises(WireFormatError):
        message_from_frames([pb.Frame.FromString(f) for f in bad], LIMITS)
    with pytest.raises(ref.SpecError):
        ref.decode_frames(bad)


@pytest.mark.parametrize("name", FRAMES)
def test_framed_golden_files_are_varint_length_prefixed_frames(name: str) -> None:
    """wire-format §15: a ``frames`` file is each serialized Frame preceded by its length as a
    protobuf varint (no other header, nothing after the last frame); read here byte by byte."""
    data = gv.vector_bytes(VECTORS[name])
    frames, pos = [], 0
    while pos < len(data):
        size, shift = 0, 0
        while True:  # a varint: 7 bits per byte, least significant first, high bit = more
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        assert pos + size <= len(data)
        frames.append(data[pos : pos + size])
        pos += size
    assert pos == len(data) and len(frames) >= 1
    kinds = [pb.Frame.FromString(f).WhichOneof("kind") for f in frames]
    assert kinds == ["header"] + ["chunk"] * (len(frames) - 1)


def _map_keys(header: bytes, field: int) -> list[bytes]:
    """The keys of map field ``field`` of a serialized Header, in the order they were written;
    each entry carries both its key (1) and its value (2), even when the value is the default."""
    keys = []
    for number, _, entry in ref.scan_bundle(header):
        if number == field:
            assert isinstance(entry, bytes)
            fields = {n: v for n, _, v in ref.scan_bundle(entry)}
            assert set(fields) == {1, 2}
            keys.append(fields[1])
    return keys


@pytest.mark.parametrize("name", FRAMES)
def test_framed_golden_headers_write_map_entries_in_key_order(name: str) -> None:
    """wire-format §3: the golden Header frames are protobuf's deterministic serialization, map
    entries sorted by key bytes; protobuf writes a map entry's value even when it is 0 or ""."""
    frame = _frames(VECTORS[name])[0]
    (number, _, header), *rest = list(ref.scan_bundle(frame))
    assert number == 1 and not rest and isinstance(header, bytes)
    for field, key in ((7, "scalars"), (8, "tags")):
        keys = _map_keys(header, field)
        assert keys == sorted(keys) and len(keys) == len(VECTORS[name]["message"][key])
    assert frame == pb.Frame.FromString(frame).SerializeToString(deterministic=True)
    zero = pb.Header(scalars={"a": 0.0}, tags={"b": ""}).SerializeToString()
    assert _map_keys(zero, 7) == [b"a"] and _map_keys(zero, 8) == [b"b"]


def test_both_decoders_give_nan_for_an_infinite_value_times_a_zero_row_scale() -> None:
    """wire-format §9.5: a finite scale may overflow a block value to infinity, and infinity times
    a row scale of 0 is NaN; the only way a valid tensor decodes to NaN (RAW aside)."""
    t = pb.PackedTensor(
        format_version=3,
        name="x",
        shape=[8, 1],
        dtype=pb.FLOAT32,
        encoding=pb.QUANTIZED,
        granularity=pb.TENSOR,
        scale_dtype=pb.FLOAT32,
        bits=bytes([8]),
        scales=struct.pack("<f", 3e38),
        offsets=struct.pack("<f", 0.0),
        payload=bytes([255, 255, 1, 0, 0, 0, 0, 0]),
        row_scales=struct.pack("<8e", 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    )
    got = dequantize(packed_from_proto(t, LIMITS)[1]).reshape(-1)[:4].tolist()
    with np.errstate(invalid="ignore", over="ignore"):
        d = ref.decode_tensor(t)
    ref_got = np.frombuffer(d.data, dtype="<f4")[:4].tolist()
    for values in (got, ref_got):
        assert math.isnan(values[0]) and values[1:] == [math.inf, np.float32(3e38), 0.0]


def test_stochastic_rounding_noise_is_mt19937_low_24_bits_in_block_view_order() -> None:
    """wire-format §11.2: on the CPU, fedq's stochastic rounding draws u = (w & 0xFFFFFF) * 2^-24
    from the 32-bit outputs w of MT19937 seeded with the generator's seed (numpy's RandomState
    is that generator), one per element of the block view in order; the golden vector's codes
    follow from its inputs, its scales and offsets and that stream."""
    vector = VECTORS["stochastic_seeded"]
    (t,) = vector["tensors"]
    (p,) = _packed_tensors(vector)
    assert t["encode"]["spec"]["granularity"] == "channel" and p.granularity == pb.CHANNEL
    assert p.axis == 0 and not p.symmetric and p.scale_dtype == pb.FLOAT32
    x = gv.tensor_from_json(t["input"]).numpy().astype(np.float32)  # axis 0: rows are blocks
    words = np.random.RandomState(t["encode"]["seed"]).randint(0, 2**32, x.size, dtype=np.uint64)
    u = ((words & 0xFFFFFF).astype(np.float32) * np.float32(2**-24)).reshape(x.shape)
    scale = np.frombuffer(p.scales, dtype="<f4")[:, None]
    offset = np.frombuffer(p.offsets, dtype="<f4")[:, None]
    levels = np.float32(2 ** t["encode"]["bits"] - 1)
    v = (x - offset) / np.where(scale > 0, scale, 1)
    codes = np.clip(np.floor(v + u), 0, levels)
    assert (codes != np.clip(np.round(v), 0, levels)).any()  # the noise does decide codes
    sent = ref.unpack_run(p.payload, t["encode"]["bits"], x.size)
    assert sent.tolist() == codes.astype(np.uint8).reshape(-1).tolist()
