"""Every encoding, granularity, bit width and mixed bit map survives serialization bit-exactly."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedq.codec import FORMAT_VERSION, Granularity, QuantSpec, dequantize, quantize, raw
from fedq.wire import (
    WireLimits,
    bundle_from_bytes,
    bundle_to_bytes,
    packed_from_proto,
    packed_to_proto,
)
from fedq.wire.pb import tensor_pb2 as pb

LIMITS = WireLimits()


def _specs() -> list[QuantSpec]:
    grans = [
        (Granularity.TENSOR, 0, 0),
        (Granularity.CHANNEL, 0, 0),
        (Granularity.CHANNEL, 1, 0),
        (Granularity.CHANNEL, -1, 0),
        (Granularity.GROUP, 0, 8),
        (Granularity.GROUP, 0, 7),  # partial last group
    ]
    plain = [
        QuantSpec(granularity=g, axis=a, group_size=gs or 128, symmetric=sym, scale_dtype=sdt)
        for (g, a, gs), sym, sdt in itertools.product(grans, [False, True], ["float16", "float32"])
    ]
    two_way = [  # clipped ranges and per-row scales (format version 2)
        QuantSpec(granularity=g, axis=a, group_size=gs or 128, range="sigma", row_scale=True)
        for g, a, gs in grans
    ]
    return plain + two_way


@pytest.mark.parametrize("two_way", [False, True], ids=["minmax", "sigma+rows"])
def test_outlier_rows_roundtrip(two_way: bool, assert_packed_equal) -> None:
    x = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(2))
    x[:, 0] *= 50.0
    extra: dict = {"range": "sigma", "row_scale": True} if two_way else {}
    p = quantize(x, 3, QuantSpec(axis=-1, outlier_ratio=3.0, **extra))
    assert p.outlier_index is not None and p.outlier_index.numel() == 3
    _, back = packed_from_proto(
        pb.PackedTensor.FromString(packed_to_proto(p, "h").SerializeToString()), LIMITS
    )
    assert_packed_equal(p, back)
    assert torch.equal(dequantize(back), dequantize(p))


@pytest.mark.parametrize("spec", _specs(), ids=str)
def test_quantized_roundtrip_every_bit_width(spec: QuantSpec, assert_packed_equal) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 3, generator=gen)
    for bits in range(1, 9):
        p = quantize(x, bits, spec)
        name, back = packed_from_proto(
            pb.PackedTensor.FromString(packed_to_proto(p, "w").SerializeToString()), LIMITS
        )
        assert name == "w"
        assert_packed_equal(p, back)
        assert torch.equal(dequantize(back), dequantize(p))


@pytest.mark.parametrize("spec", _specs()[::3], ids=str)
def test_mixed_bit_maps_roundtrip(spec: QuantSpec, assert_packed_equal) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 10, generator=gen)
    nb = spec.layout_for(tuple(x.shape), bit_map=True).num_blocks
    bit_map = torch.randint(1, 9, (nb,), generator=gen, dtype=torch.uint8)
    p = quantize(x, bit_map, spec)
    back = bundle_from_bytes(bundle_to_bytes({"mixed": p}), LIMITS)["mixed"]
    assert_packed_equal(p, back)
    assert torch.equal(dequantize(back), dequantize(p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_raw_and_quantized(dtype: torch.dtype, assert_packed_equal) -> None:
    x = torch.randn(4, 9).to(dtype)
    tensors = {"raw": raw(x), "q": quantize(x, 3), "scalar": raw(x[0, 0]), "empty": raw(x[:0])}
    back = bundle_from_bytes(bundle_to_bytes(tensors), LIMITS)
    assert list(back) == list(tensors)
    for name, p in tensors.items():
        assert_packed_equal(p, back[name])
    assert torch.equal(dequantize(back["raw"]), x)
    assert back["raw"].payload.dtype == torch.uint8 and back["raw"].payload.is_contiguous()


def test_empty_quantized_and_empty_bundle(assert_packed_equal) -> None:
    sym = quantize(torch.empty(0, 4), 4, QuantSpec(symmetric=True))
    asym = quantize(torch.empty(3, 0), 4, QuantSpec(granularity=Granularity.GROUP, group_size=4))
    back = bundle_from_bytes(bundle_to_bytes({"a": sym, "b": asym}), LIMITS)
    assert_packed_equal(sym, back["a"])
    assert_packed_equal(asym, back["b"])
    assert bundle_from_bytes(bundle_to_bytes({}), LIMITS) == {}


def test_bundle_bytes_match_protobuf_serialization() -> None:
    """The piecewise writer must emit exactly what protobuf would, so any protobuf reader works."""
    x = torch.randn(3, 4)
    tensors = {"a": quantize(x, 2), "b": raw(x)}
    whole = pb.TensorBundle(
        format_version=FORMAT_VERSION, tensors=[packed_to_proto(p, n) for n, p in tensors.items()]
    ).SerializeToString()
    assert bundle_to_bytes(tensors) == whole
