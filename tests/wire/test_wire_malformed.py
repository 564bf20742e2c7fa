"""A corpus of malformed serialized tensors and bundles: each is rejected with WireFormatError and
a message naming the offending field, before anything large is allocated."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable

import pytest
import torch

from fedq.codec import FORMAT_VERSION, Granularity, QuantSpec, quantize, raw
from fedq.errors import WireFormatError
from fedq.wire import WireLimits, bundle_from_bytes, bundle_to_bytes, packed_to_proto
from fedq.wire.pb import tensor_pb2 as pb
from fedq.wire.protowire import encode_len_field

LIMITS = WireLimits()
# Rows of 16 values: long enough that per-channel quantization stays per-channel (shorter rows
# fall back to groups, see QuantSpec.layout_for), so the corpus covers CHANNEL messages.
X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
XO = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))


def _asym() -> pb.PackedTensor:
    return packed_to_proto(quantize(X, 4, QuantSpec(scale_dtype="float32")), "fc1.weight")


def _sym() -> pb.PackedTensor:
    return packed_to_proto(quantize(X, 4, QuantSpec(symmetric=True)), "fc1.weight")


def _group() -> pb.PackedTensor:
    spec = QuantSpec(granularity=Granularity.GROUP, group_size=5)
    return packed_to_proto(quantize(X, 3, spec), "fc1.weight")


def _rows() -> pb.PackedTensor:
    spec = QuantSpec(axis=-1, range="sigma", row_scale=True)
    return packed_to_proto(quantize(X, 2, spec), "h")


def _outl() -> pb.PackedTensor:
    x = XO.clone()
    x[0] *= 100.0  # one outlier row (of 16: at most 2 allowed)
    return packed_to_proto(quantize(x, 3, QuantSpec(axis=-1, outlier_ratio=3.0)), "h")


def _index(*rows: int) -> bytes:
    return struct.pack(f"<{len(rows)}i", *rows)


def _raw() -> pb.PackedTensor:
    return packed_to_proto(raw(X), "fc1.weight")


def _bundle(*msgs: pb.PackedTensor, version: int = FORMAT_VERSION) -> bytes:
    return pb.TensorBundle(format_version=version, tensors=list(msgs)).SerializeToString()


def _set(make: Callable[[], pb.PackedTensor], **fields: object) -> bytes:
    msg = make()
    for k, v in fields.items():
        if k == "shape":
            del msg.shape[:]
            msg.shape.extend(v)  # type: ignore[arg-type]
        else:
            setattr(msg, k, v)
    return _bundle(msg)


def _bits(make: Callable[[], pb.PackedTensor], index: int, value: int) -> bytes:
    msg = make()
    b = bytearray(msg.bits)
    b[index] = value
    msg.bits = bytes(b)
    return _bundle(msg)


def _truncated_entry() -> bytes:
    body = _asym().SerializeToString()[:-5]
    return _bundle() + encode_len_field(2, len(body)) + body


CORPUS: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated bundle": (lambda: bundle_to_bytes({"a": quantize(X, 4)})[:-3], "tensors"),
    "truncated tensor entry": (_truncated_entry, "tensors"),
    "bundle version": (lambda: _bundle(_asym(), version=FORMAT_VERSION + 1), "format_version"),
    "bundle version missing": (lambda: _bundle(_asym(), version=0), "format_version"),
    "tensor version": (lambda: _set(_asym, format_version=FORMAT_VERSION + 1), "format_version"),
    "payload too long": (lambda: _set(_asym, payload=_asym().payload + b"\0"), "payload"),
    "payload too short": (lambda: _set(_group, payload=_group().payload[:-1]), "payload"),
    "raw payload short": (lambda: _set(_raw, payload=_raw().payload[:-4]), "payload"),
    "bits 0": (lambda: _bits(_asym, 2, 0), "bits"),
    "bits 9": (lambda: _bits(_asym, 0, 9), "bits"),
    "bits length": (lambda: _set(_asym, bits=_asym().bits[:-1]), "bits"),
    "NaN scale f32": (
        lambda: _set(_asym, scales=struct.pack("<f", float("nan")) + _asym().scales[4:]),
        "scales",
    ),
    "NaN scale f16": (lambda: _set(_sym, scales=b"\x00\x7e" + _sym().scales[2:]), "scales"),
    "negative scale": (
        lambda: _set(_asym, scales=struct.pack("<f", -1.0) + _asym().scales[4:]),
        "scales",
    ),
    "Inf offset": (
        lambda: _set(_asym, offsets=_asym().offsets[:-4] + struct.pack("<f", float("inf"))),
        "offsets",
    ),
    "scales length": (lambda: _set(_asym, scales=_asym().scales + b"\0\0\0\0"), "scales"),
    "row scales length": (lambda: _set(_rows, row_scales=_rows().row_scales[:-2]), "row_scales"),
    "row scales NaN": (
        lambda: _set(_rows, row_scales=b"\x00\x7e" + _rows().row_scales[2:]),
        "row_scales",
    ),
    "row scales negative": (
        lambda: _set(_rows, row_scales=b"\x00\xbc" + _rows().row_scales[2:]),
        "row_scales",
    ),
    "row scales on raw": (lambda: _set(_raw, row_scales=b"\x00\x3c"), "row_scales"),
    "outlier index length": (
        lambda: _set(_outl, outlier_index=_outl().outlier_index[:-1]),
        "outlier_index",
    ),
    "outlier values length": (
        lambda: _set(_outl, outlier_values=_outl().outlier_values[:-2]),
        "outlier_values",
    ),
    "outlier values alone": (lambda: _set(_outl, outlier_index=b""), "outlier_values"),
    "outlier row out of range": (
        lambda: _set(_outl, outlier_index=_index(XO.shape[0])),
        "outlier_index",
    ),
    "outlier row negative": (lambda: _set(_outl, outlier_index=_index(-1)), "outlier_index"),
    "outlier rows repeated": (
        lambda: _set(_outl, outlier_index=_index(1, 1), outlier_values=_outl().outlier_values * 2),
        "outlier_index",
    ),
    "too many outlier rows": (
        lambda: _set(
            _outl, outlier_index=_index(*range(3)), outlier_values=_outl().outlier_values * (3)
        ),
        "outlier_index",
    ),
    "outlier values NaN": (
        lambda: _set(_outl, outlier_values=b"\x00\x7e" + _outl().outlier_values[2:]),
        "outlier_values",
    ),
    "outlier rows on raw": (lambda: _set(_raw, outlier_index=_index(0)), "outlier_index"),
    "offsets on symmetric": (lambda: _set(_sym, offsets=_sym().scales), "offsets"),
    "offsets missing on asymmetric": (lambda: _set(_asym, offsets=b""), "offsets"),
    "huge shape": (lambda: _set(_asym, shape=[2**40, 2**40]), "shape"),
    "huge dim times zero": (lambda: _set(_raw, shape=[0, 2**63]), "shape"),
    "huge product": (lambda: _set(_raw, shape=[2**16, 2**16, 2**16]), "shape"),
    "rank 9": (lambda: _set(_raw, shape=[1] * 9), "shape"),
    "unknown dtype": (lambda: _set(_asym, dtype=7), "dtype"),
    "unspecified dtype": (lambda: _set(_asym, dtype=0), "dtype"),
    "unspecified encoding": (lambda: _set(_asym, encoding=0), "encoding"),
    "unknown granularity": (lambda: _set(_asym, granularity=9), "granularity"),
    "bfloat16 scales": (lambda: _set(_asym, scale_dtype=pb.BFLOAT16), "scale_dtype"),
    "channel axis": (lambda: _set(_asym, axis=2), "axis"),
    "group size 0": (lambda: _set(_group, group_size=0), "group_size"),
    "raw with bits": (lambda: _set(_raw, bits=b"\x04"), "bits"),
    "raw per channel": (lambda: _set(_raw, granularity=pb.CHANNEL), "granularity"),
    "duplicate names": (lambda: _bundle(_asym(), _sym()), "name"),
    "empty name": (lambda: _set(_asym, name=""), "name"),
    "group wire type": (lambda: _bundle(_asym()) + b"\x13", "tensors"),
    "tensors as varint": (lambda: _bundle(_asym()) + b"\x10\x01", "tensors"),
    "truncated varint": (lambda: _bundle(_asym()) + b"\x80", "tag"),
    "truncated length": (lambda: _bundle(_asym()) + b"\x12\x80", "tensors"),
}


@pytest.mark.parametrize("case", list(CORPUS), ids=list(CORPUS))
def test_malformed_bundle_is_rejected_naming_the_field(case: str) -> None:
    make, field = CORPUS[case]
    data = make()
    with pytest.raises(WireFormatError) as exc:
        bundle_from_bytes(data, LIMITS)
    assert f"'{field}'" in str(exc.value), str(exc.value)


def test_error_message_names_tensor_and_field() -> None:
    with pytest.raises(WireFormatError) as exc:
        bundle_from_bytes(_bits(_asym, 0, 9), LIMITS)
    assert str(exc.value) == "tensor 'fc1.weight': field 'bits': value 9 out of range 1..8"


def test_limits_on_tensor_count_and_payload_size() -> None:
    data = _bundle(_set_name(_raw(), "a"), _set_name(_raw(), "b"))
    assert len(bundle_from_bytes(data, LIMITS)) == 2
    with pytest.raises(WireFormatError, match="'tensors'"):
        bundle_from_bytes(data, WireLimits(max_tensors=1))
    with pytest.raises(WireFormatError, match="'payload'"):
        bundle_from_bytes(data, WireLimits(max_payload_bytes=len(data) - 1))
    with pytest.raises(WireFormatError, match="'shape'"):
        bundle_from_bytes(data, WireLimits(max_elements=23))


def _set_name(msg: pb.PackedTensor, name: str) -> pb.PackedTensor:
    msg.name = name
    return msg


def test_valid_large_shape_claim_does_not_allocate() -> None:
    """A shape within limits but with a tiny payload fails on the length check, not in malloc."""
    data = _set(_raw, shape=[2**15, 2**15])  # would be a 4 GiB float32 tensor
    tracemalloc.start()
    try:
        with pytest.raises(WireFormatError, match="'payload'"):
            bundle_from_bytes(data, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_sender_rejects_inconsistent_scales() -> None:
    p = quantize(X, 4, QuantSpec(scale_dtype="float16"))
    bad = type(p)(**{**{f: getattr(p, f) for f in p.__slots__}, "scales": p.scales.float()})
    with pytest.raises(WireFormatError, match="scale"):
        packed_to_proto(bad, "x")
