"""Block layout: how a tensor is cut into quantization blocks (tensor, channels or groups).

Every block has one scale, one offset (asymmetric only) and one bit-width. The layout is a pure
function of (shape, granularity, axis, group size), so the sender, the receiver and the wire
validator all derive the same block sizes without trusting anything else.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

#: A piece of the [num_blocks, block_len] view: ``(rows, cols, k)``, ``k`` numbering the column
#: ranges of one block (0 when a piece holds whole blocks).
Piece = tuple[slice, slice, int]


class Granularity(enum.Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Blocks of a tensor of ``shape``: ``num_blocks`` rows of ``block_len`` elements.

    For groups the last block may be partial (``last_len < block_len``); channel and tensor blocks
    are always full. ``axis`` is normalised to be non-negative.
    """

    shape: tuple[int, ...]
    granularity: Granularity
    axis: int
    group_size: int
    numel: int
    num_blocks: int
    block_len: int
    last_len: int

    @staticmethod
    def build(
        shape: tuple[int, ...], granularity: Granularity, *, axis: int = 0, group_size: int = 0
    ) -> BlockLayout:
        numel = math.prod(shape)
        if granularity is Granularity.TENSOR:
            nb, bl = (1, numel) if numel else (0, 0)
            return BlockLayout(shape, granularity, 0, 0, numel, nb, bl, bl)
        if granularity is Granularity.CHANNEL:
            if not shape:
                raise ValueError("per-channel quantization needs a tensor with at least 1 dim")
            if not -len(shape) <= axis < len(shape):
                raise ValueError(f"axis {axis} out of range for shape {list(shape)}")
            axis %= len(shape)
            channels = shape[axis]
            bl = numel // channels if channels else 0
            nb = channels if numel else 0
            return BlockLayout(shape, granularity, axis, 0, numel, nb, bl, bl)
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        nb = -(-numel // group_size)
        last = numel - (nb - 1) * group_size if nb else 0
        return BlockLayout(shape, granularity, 0, group_size, numel, nb, group_size, last)

    @property
    def padding(self) -> int:
        """Elements of padding in the last row of the [num_blocks, block_len] view."""
        return self.block_len - self.last_len if self.num_blocks else 0

    def block_lengths(self) -> torch.Tensor:
        """int64 [num_blocks]: valid elements per block."""
        lens = torch.full((self.num_blocks,), self.block_len, dtype=torch.int64)
        if self.num_blocks:
            lens[-1] = self.last_len
        return lens

    def pieces(self, max_elems: int) -> list[Piece]:
        """Pieces of at most ``max_elems`` elements covering the block view in element order:
        runs of whole blocks when blocks are short, else column ranges of one block at a time.
        The codec works piece by piece so that its temporaries stay in cache."""
        nb, bl = self.num_blocks, self.block_len
        if bl <= max_elems:
            step = max_elems // max(bl, 1)
            return [(slice(r, r + step), slice(0, bl), 0) for r in range(0, nb, step)]
        cols = range(0, bl, max_elems)
        return [
            (slice(r, r + 1), slice(c, c + max_elems), k)
            for r in range(nb)
            for k, c in enumerate(cols)
        ]

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """View/copy ``x`` as [num_blocks, block_len]; a partial last group is padded by repeating
        its last element, which leaves the block's min and max unchanged."""
        if self.granularity is Granularity.CHANNEL:
            return x.movedim(self.axis, 0).reshape(self.num_blocks, self.block_len)
        flat = x.reshape(-1)
        if self.padding:
            flat = torch.cat([flat, flat[-1:].expand(self.padding)])
        return flat.view(self.num_blocks, self.block_len)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_blocks` (drops padding, restores shape and axis order)."""
        if self.granularity is Granularity.CHANNEL:
            moved = list(self.shape)
            moved.insert(0, moved.pop(self.axis))
            return blocks.reshape(moved).movedim(0, self.axis)
        flat = blocks.reshape(-1)
        if self.padding:
            flat = flat[: self.numel]
        return flat.reshape(self.shape)
