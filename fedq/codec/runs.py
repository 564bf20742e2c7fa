"""Where each bit-width's run lies in a quantized payload (format v3).

The payload holds one run per bit-width present in the bit map, by ascending width; a run is the
codes of that width's blocks in block order (a partial last group contributes only its real
elements), packed LSB-first (:mod:`fedq.codec.bitpack`) from a byte boundary. So the run of
width ``b`` starts right after the runs of the narrower widths, and its ``t``-th block starts
``t * block_len`` codes into it: everything a decoder needs to find any code, from the layout and
the bit map alone. The streaming decoder and the GPU kernels use these tables; the torch codec
packs and unpacks the same layout in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedq.codec.bitpack import packed_nbytes
from fedq.codec.layout import BlockLayout


@dataclass(frozen=True, slots=True, eq=False)
class Run:
    """The codes of one bit-width: ``blocks`` (int64, ascending block indices, CPU), ``numel``
    codes starting at payload byte ``byte_start`` and taking ``nbytes`` bytes. ``all_blocks``:
    the run holds every block (a uniform bit map), so its ``t``-th block is block ``t``."""

    bits: int
    blocks: torch.Tensor
    numel: int
    byte_start: int
    nbytes: int
    all_blocks: bool


def payload_runs(layout: BlockLayout, bits: torch.Tensor) -> list[Run]:
    """The runs of a payload with this layout and bit map, in payload order (widths ascending)."""
    bm = bits.detach().to("cpu").reshape(-1).to(torch.int64)
    if bm.numel() != layout.num_blocks:
        raise ValueError(f"bit map has {bm.numel()} entries for {layout.num_blocks} blocks")
    runs: list[Run] = []
    pos = 0
    last = layout.num_blocks - 1
    for b in torch.unique(bm).tolist():
        blocks = (bm == b).nonzero().squeeze(1)
        n = blocks.numel() * layout.block_len
        if layout.padding and int(blocks[-1]) == last:
            n -= layout.padding
        nbytes = packed_nbytes(n, int(b))
        runs.append(Run(int(b), blocks, n, pos, nbytes, blocks.numel() == layout.num_blocks))
        pos += nbytes
    return runs
