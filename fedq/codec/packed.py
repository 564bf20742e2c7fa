"""``PackedTensor``: a quantized tensor ready for the wire, with everything needed to decode it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from fedq.codec.bitpack import packed_nbytes
from fedq.codec.layout import BlockLayout, Granularity

#: Version of the packed format (payload layout + metadata meaning). Bumped on any change.
FORMAT_VERSION = 3

#: Floating dtypes fedq quantizes; the decoded tensor has the same dtype as the input.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: Dtypes the metadata (scales, offsets) may be stored in.
SCALE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
#: Storage dtype of the optional per-row scales (format version 2): 2 bytes per row.
ROW_SCALE_DTYPE = torch.float16
#: Outlier rows (format version 3): int32 row indices, float16 values (2 bytes per element).
OUTLIER_INDEX_DTYPE = torch.int32
OUTLIER_VALUE_DTYPE = torch.float16
#: At most this share of a tensor's rows is sent as outlier rows (the receiver enforces it too).
MAX_OUTLIER_FRACTION = 0.125


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in FLOAT_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; fedq quantizes {sorted(FLOAT_DTYPES)}")


class Encoding(enum.Enum):
    #: Codes at 1..8 bits per element, per-block scale (and offset), bit map.
    QUANTIZED = "quantized"
    #: The tensor's own bytes, uncompressed (identity codec, fp32 baselines).
    RAW = "raw"


@dataclass(frozen=True, slots=True, eq=False)
class PackedTensor:
    """A tensor encoded for transmission. Its tensors live on the CPU (it is the wire form, whatever
    device the source was on); ``dequantize(p, device=...)`` decodes onto a device.

    - ``bits``: uint8 [num_blocks], the bit map (one width per block, 1..8); empty for RAW.
    - ``scales``: [num_blocks] in ``scale_dtype``: the step between adjacent codes.
    - ``offsets``: [num_blocks] (asymmetric only): the value of code 0. Symmetric blocks decode
      ``scale * (q - (2**b - 1)/2)`` (mid-rise levels, symmetric around zero, valid for b=1).
    - ``payload``: uint8, codes grouped by bit-width class (1, then 2, ... 8), each class packed as
      one run in element order (see :mod:`fedq.codec.bitpack`); RAW holds the tensor's bytes.
    - ``row_scales`` (optional, float16 [numel / shape[-1]]): each row of the last dimension of
      the decoded tensor is multiplied by its entry (``QuantSpec.row_scale``, version 2).
    - ``outlier_index`` / ``outlier_values`` (optional, int32 [k] strictly increasing / float16
      [k, shape[-1]]): rows of the last dimension sent as float16 instead of codes
      (``QuantSpec.outlier_ratio``, version 3); they replace those rows of the decoded tensor
      after the row scales are applied.
    """

    shape: tuple[int, ...]
    dtype: str
    encoding: Encoding
    granularity: Granularity
    axis: int
    group_size: int
    symmetric: bool
    scale_dtype: str
    bits: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    payload: torch.Tensor
    row_scales: torch.Tensor | None = None
    outlier_index: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None
    version: int = FORMAT_VERSION

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout.build(
            self.shape, self.granularity, axis=self.axis, group_size=self.group_size
        )

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def payload_nbytes(self) -> int:
        return int(self.payload.numel())

    @property
    def metadata_nbytes(self) -> int:
        """Declared metadata: bit map (one byte per block) plus scales, offsets, row scales and
        outlier rows (indices and float16 values)."""
        n = self.scales.numel() * self.scales.element_size()
        for t in (self.row_scales, self.outlier_index, self.outlier_values):
            if t is not None:
                n += t.numel() * t.element_size()
        if self.offsets is not None:
            n += self.offsets.numel() * self.offsets.element_size()
        return int(n + self.bits.numel())

    def mean_bits(self) -> float:
        """Average bits per element actually used by the payload codes."""
        if self.encoding is Encoding.RAW:
            return float(8 * FLOAT_DTYPES[self.dtype].itemsize)
        if self.numel == 0:
            return 0.0
        lens = self.layout.block_lengths()
        return float((lens * self.bits.to(torch.int64)).sum()) / self.numel


def expected_payload_nbytes(layout: BlockLayout, bits: torch.Tensor) -> int:
    """Payload size implied by a layout and bit map: sum over classes of ceil(n_b * b / 8)."""
    nb = layout.num_blocks
    if bits.numel() != nb:
        raise ValueError(f"bit map has {bits.numel()} entries for {nb} blocks")
    if nb == 0:
        return 0
    # Elements per width: every block holds block_len elements but the last may be partial.
    flat = bits.reshape(-1).to(torch.int64)
    n = [c * layout.block_len for c in torch.bincount(flat).tolist()]
    n[int(flat[-1])] -= layout.padding
    return sum(packed_nbytes(n[b], b) for b in range(1, min(len(n), 9)))
