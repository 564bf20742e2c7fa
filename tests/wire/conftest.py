"""Shared helpers for wire tests: an exact equality check for PackedTensor."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedq.codec import PackedTensor


def _same(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is None or b is None:
        return
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.device.type == "cpu" and b.device.type == "cpu", what
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), what


def packed_equal(a: PackedTensor, b: PackedTensor) -> None:
    """Bit-exact equality of every metadata field and every byte (NaN-safe: compares bytes)."""
    for f in ("shape", "dtype", "encoding", "granularity", "axis", "group_size", "symmetric"):
        assert getattr(a, f) == getattr(b, f), f
    assert (a.scale_dtype, a.version) == (b.scale_dtype, b.version)
    _same(a.bits, b.bits, "bits")
    _same(a.scales, b.scales, "scales")
    _same(a.offsets, b.offsets, "offsets")
    _same(a.payload, b.payload, "payload")
    assert (a.row_scales is None) == (b.row_scales is None), "row_scales presence"
    _same(a.row_scales, b.row_scales, "row_scales")
    _same(a.outlier_index, b.outlier_index, "outlier_index")
    _same(a.outlier_values, b.outlier_values, "outlier_values")
    if a.outlier_values is not None and b.outlier_values is not None:
        assert a.outlier_values.shape == b.outlier_values.shape, "outlier_values shape"


@pytest.fixture
def assert_packed_equal() -> Callable[[PackedTensor, PackedTensor], None]:
    return packed_equal
