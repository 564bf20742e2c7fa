"""Payload buffers for received messages, recycled once nothing views them.

A received message's payload is copied once, into one buffer that its decoded tensors then share
(:func:`fedq.wire.message.read_message`). Memory fresh from the OS costs a page fault and a zeroing
pass by the kernel on first touch, which for a large payload costs about as much as the copy
itself. So a large buffer goes back to a small pool when the last tensor (or any other view) of
it is gone, and the next message of a similar size is copied into memory that is already mapped.
Buffers are numpy arrays: not zero-filled, and numpy asks the OS for huge pages for large ones.
"""

from __future__ import annotations

import queue
import threading
import weakref

import numpy as np
import numpy.typing as npt

#: Payloads below this size get a buffer of their own: small allocations are cheap already.
MIN_POOLED = 1 << 20

Block = npt.NDArray[np.uint8]


class BufferPool:
    """Hands out writable buffers and takes large ones back when nothing views them any more.

    A block of capacity ``c`` serves a request for ``size`` bytes if ``size <= c <= size * 5 / 4``;
    new blocks get 1/8 of slack so that payloads that vary a little from message to message
    still fit. At most ``max_free`` unused blocks are kept (the most recently returned); older
    ones are freed. Thread-safe: buffers come back from whichever thread drops the last view.
    """

    def __init__(self, max_free: int = 4) -> None:
        self.max_free = max_free
        # Filled from weakref callbacks, which may run inside any code, this pool's included:
        # SimpleQueue.put is safe there, a lock would not be.
        self._returned: queue.SimpleQueue[Block] = queue.SimpleQueue()
        self._free: list[Block] = []
        self._lock = threading.Lock()
        self.reused = 0  # buffers served from the pool, for tests and diagnostics

    def take(self, size: int) -> memoryview:
        """A writable, uninitialized buffer of exactly ``size`` bytes.

        A memoryview, not the array: everything made from it (slices, ``np.frombuffer``,
        ``torch.frombuffer``) holds the view that the pool watches, whereas numpy would let a
        slice of an array refer past it to the block."""
        if size < MIN_POOLED:
            return np.empty(size, dtype=np.uint8).data
        block = self._reuse(size)
        if block is None:
            block = np.empty(size + size // 8, dtype=np.uint8)
        return self._lend(block, size)

    def take_pooled(self, size: int) -> memoryview | None:
        """:meth:`take`, but only from memory the pool already holds (None if none fits)."""
        block = self._reuse(size) if size >= MIN_POOLED else None
        return None if block is None else self._lend(block, size)

    def _lend(self, block: Block, size: int) -> memoryview:
        view = block[:size]
        # ``view`` lives as long as anything (a memoryview, a tensor made from one) views it.
        weakref.finalize(view, self._returned.put, block).atexit = False
        return view.data

    def free_blocks(self) -> int:
        """Unused blocks held right now."""
        with self._lock:
            self._collect()
            return len(self._free)

    def _collect(self) -> None:
        while True:
            try:
                self._free.append(self._returned.get_nowait())
            except queue.Empty:
                break
        del self._free[: -self.max_free or len(self._free)]

    def _reuse(self, size: int) -> Block | None:
        with self._lock:
            self._collect()
            fits = [i for i, b in enumerate(self._free) if size <= b.size <= size + size // 4]
            if not fits:
                return None
            self.reused += 1
            return self._free.pop(min(fits, key=lambda i: self._free[i].size))


#: The pool :func:`fedq.wire.message.read_message` takes its payload buffers from.
PAYLOAD_BUFFERS = BufferPool()
