"""Streaming decode: a packed tensor decoded while its payload arrives, chunk by chunk.

A receiver need not hold a large payload whole before decoding it. Every code sits at a bit
offset fixed by the header alone (layout and bit map; :mod:`fedq.codec.runs`), so once a prefix
of the payload has arrived, every code lying wholly inside it can be decoded to its place in the
output, overlapping decoding with the transfer. :class:`StreamDecoder` takes the payload in order
(:meth:`~StreamDecoder.feed`, any chunk sizes) and decodes what each chunk completes: on a CUDA
device with the kernels (:mod:`fedq.codec.dispatch`) any newly complete range of codes, with the
torch path whole bytes of codes (8 codes at a time, which always end on a byte boundary). Row
scales and outlier rows travel after the payload (fields 15-17 of the wire message follow the
payload, field 14), so :meth:`~StreamDecoder.finish` applies them. RAW tensors stream too: their
bytes go straight into the output. The result is bit-identical to
:func:`fedq.codec.dequantize` of the whole tensor, however the payload was cut.
"""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType
from typing import Any

import torch

from fedq.codec import dispatch
from fedq.codec.bitpack import packed_nbytes, unpack_bits
from fedq.codec.layout import Granularity
from fedq.codec.packed import FLOAT_DTYPES, Encoding, PackedTensor
from fedq.codec.reference import restore_rows
from fedq.codec.runs import payload_runs
from fedq.errors import CodecError

Bytes = bytes | bytearray | memoryview


class StreamDecoder:
    """Decodes one tensor whose header is ``header`` (a :class:`PackedTensor`; its payload, row
    scales and outlier rows are ignored: they are what arrives later) onto ``device``."""

    def __init__(self, header: PackedTensor, *, device: torch.device | str | None = None) -> None:
        self.header = header
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = FLOAT_DTYPES[header.dtype]
        self.out = torch.empty(header.shape, dtype=dtype, device=self.device)
        numel = self.out.numel()
        self._received = 0
        self._runs = []
        self._kernels: ModuleType | None = None
        self._plan: Any = None
        if header.encoding is Encoding.RAW:
            self.total = numel * dtype.itemsize
            return
        layout = header.layout
        nb = layout.num_blocks
        if header.bits.numel() != nb or header.scales.numel() != nb:
            raise CodecError(f"stream: bit map and scales need {nb} entries each")
        if header.symmetric != (header.offsets is None):
            raise CodecError("stream: offsets must be given exactly for asymmetric tensors")
        self._runs = payload_runs(layout, header.bits)
        self.total = sum(r.nbytes for r in self._runs)
        self._done = [0] * len(self._runs)
        self._buf = torch.empty(self.total, dtype=torch.uint8, device=self.device)
        self._kernels = dispatch.kernels_for(self.device, numel) if numel else None
        if self._kernels is not None:
            self._plan = self._kernels.DecodePlan.build(header, self.device)
            return
        self._scales = header.scales.to(device=self.device, dtype=torch.float32)
        self._offsets = (
            None
            if header.offsets is None
            else header.offsets.to(device=self.device, dtype=torch.float32)
        )
        self._blocks = [r.blocks.to(self.device) for r in self._runs]

    @property
    def uses_kernels(self) -> bool:
        """Whether the kernels decode (else the torch path)."""
        return self._kernels is not None

    @property
    def received(self) -> int:
        """Payload bytes fed so far."""
        return self._received

    @property
    def decoded(self) -> int:
        """Elements decoded so far (before the row steps)."""
        if self.header.encoding is Encoding.RAW:
            return self._received // self.out.element_size()
        return sum(self._done)

    def feed(self, data: Bytes | torch.Tensor) -> int:
        """Append the next payload bytes and decode every code they complete; returns
        :attr:`decoded`."""
        chunk = _as_uint8(data)
        n = chunk.numel()
        if n > self.total - self._received:
            raise CodecError(
                f"stream: {self._received} + {n} bytes exceeds the payload's {self.total}"
            )
        if n == 0:
            return self.decoded
        start, self._received = self._received, self._received + n
        if self.header.encoding is Encoding.RAW:
            self.out.view(-1).view(torch.uint8)[start : self._received].copy_(chunk)
            return self.decoded
        self._buf[start : self._received].copy_(chunk)
        for i, run in enumerate(self._runs):
            avail = (self._received - run.byte_start) * 8 // run.bits
            if avail <= 0:
                break
            ready = min(run.numel, avail)
            if self._kernels is None and ready < run.numel:
                ready -= ready % 8  # the torch path unpacks whole bytes of codes
            if ready > self._done[i]:
                self._decode(i, self._done[i], ready)
                self._done[i] = ready
        return self.decoded

    def _decode(self, i: int, start: int, stop: int) -> None:
        flat = self.out.view(-1)
        if self._kernels is not None:
            self._kernels.decode_range(self._plan, self._buf, flat, i, start, stop)
            return
        run, lay = self._runs[i], self.header.layout
        b = run.bits
        lo = run.byte_start + start * b // 8  # start is a multiple of 8: a byte boundary
        q = unpack_bits(self._buf[lo : run.byte_start + packed_nbytes(stop, b)], b, stop - start)
        n = torch.arange(start, stop, device=self.device)
        t = n // lay.block_len
        r = t if run.all_blocks else self._blocks[i][t]
        j = n - t * lay.block_len
        s = self._scales[r]
        if self._offsets is None:  # the codec's maths, in its order (dequantize)
            v = (q.float() - (2**b - 1) / 2) * s
        else:
            v = q.float() * s + self._offsets[r]
        flat[_out_index(lay.shape, lay.granularity, lay.axis, lay.block_len, r, j)] = v.to(
            flat.dtype
        )

    def finish(
        self,
        row_scales: torch.Tensor | None = None,
        outlier_index: torch.Tensor | None = None,
        outlier_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoded tensor, once the whole payload is in: row scales and outlier rows (from
        the fields that follow the payload) applied as :func:`fedq.codec.dequantize` does."""
        if self._received != self.total:
            raise CodecError(f"stream: {self._received} of {self.total} payload bytes received")
        if self.header.encoding is Encoding.RAW:
            if row_scales is not None or outlier_index is not None:
                raise CodecError("stream: RAW tensors have no row scales or outlier rows")
            return self.out
        shape = self.header.shape
        rows = math.prod(shape[:-1]) if shape else 0
        if row_scales is not None and (not shape or row_scales.numel() != rows):
            raise CodecError(f"stream: row_scales must have {rows} entries")
        if (outlier_index is None) != (outlier_values is None):
            raise CodecError("stream: outlier_index and outlier_values go together")
        if outlier_values is not None and outlier_index is not None:
            if not shape or outlier_values.numel() != outlier_index.numel() * shape[-1]:
                raise CodecError("stream: outlier_values must be [len(outlier_index), shape[-1]]")
            outlier_values = outlier_values.reshape(-1, shape[-1])
        p = dataclasses.replace(
            self.header,
            row_scales=row_scales,
            outlier_index=outlier_index,
            outlier_values=outlier_values,
        )
        return restore_rows(self.out, p)


def _as_uint8(data: Bytes | torch.Tensor) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise CodecError(f"stream: payload chunks are uint8, got {data.dtype}")
        return data.reshape(-1)
    if not len(data):
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _out_index(
    shape: tuple[int, ...],
    granularity: Granularity,
    axis: int,
    block_len: int,
    r: torch.Tensor,
    j: torch.Tensor,
) -> torch.Tensor:
    """Flat output offset of element ``j`` of block ``r`` (the inverse of ``to_blocks``)."""
    if granularity is not Granularity.CHANNEL or len(shape) < 2 or axis == 0:
        return r * block_len + j
    inner = math.prod(shape[axis + 1 :])
    pre = j // inner
    return (pre * shape[axis] + r) * inner + (j - pre * inner)
