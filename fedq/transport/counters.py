"""Byte counting at the transport: what crossed the wire, per client and in total.

Both ends count the same thing, the serialized size of every protobuf message of the protocol that
crossed (Frames, TaskRequests, Acks): ``ByteSize()``, or the length of a frame that travels as its
serialized bytes (the same number). So the client's ``bytes_sent`` and the server's ``bytes_up``
agree exactly and metrics report real wire bytes, metadata included. gRPC's own framing (5 bytes
per message) and HTTP/2 headers are not counted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from fedq.wire.frame import FrameLike, frame_nbytes


class ByteCounter:
    """Thread-safe per-client totals of ``bytes_up`` (client to server) and ``bytes_down``.

    Data-plane messages (tasks, updates, split steps) count under the logical client they are
    for; control-plane messages (registration, the work stream) under the principal that sent
    them, separately (``control_up`` / ``control_down``), so a round's data bytes do not depend on
    how clients are grouped into processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, list[int]] = {}
        self._control: dict[str, list[int]] = {}

    def add(self, client_id: str, *, up: int = 0, down: int = 0, control: bool = False) -> None:
        """Add bytes for ``client_id`` ("" when the peer could not be identified); negative
        amounts take back bytes counted ahead of a call that then did not happen."""
        if not up and not down:
            return
        with self._lock:
            row = (self._control if control else self._clients).setdefault(client_id, [0, 0])
            row[0] += up
            row[1] += down

    @property
    def bytes_up(self) -> int:
        with self._lock:
            return sum(r[0] for r in self._clients.values())

    @property
    def bytes_down(self) -> int:
        with self._lock:
            return sum(r[1] for r in self._clients.values())

    def _snapshot_locked(self) -> dict[str, Any]:
        clients = {c: {"bytes_up": r[0], "bytes_down": r[1]} for c, r in self._clients.items()}
        return {
            "bytes_up": sum(r[0] for r in self._clients.values()),
            "bytes_down": sum(r[1] for r in self._clients.values()),
            "clients": clients,
            "control_up": sum(r[0] for r in self._control.values()),
            "control_down": sum(r[1] for r in self._control.values()),
        }

    def snapshot(self) -> dict[str, Any]:
        """``{"bytes_up", "bytes_down", "clients": {client_id: {"bytes_up", "bytes_down"}},
        "control_up", "control_down"}``."""
        with self._lock:
            return self._snapshot_locked()

    def reset(self) -> None:
        with self._lock:
            self._clients.clear()
            self._control.clear()

    def take(self) -> dict[str, Any]:
        """Snapshot and reset atomically: per-round metrics lose no bytes between the two."""
        with self._lock:
            snap = self._snapshot_locked()
            self._clients.clear()
            self._control.clear()
            return snap


class CountingFrames:
    """Wraps a frame iterator and adds up the serialized size of every frame that passes through.

    ``nbytes`` is the running total; ``take()`` returns what was counted since the last ``take()``,
    which lets long-lived streams (split learning) report bytes step by step.
    """

    def __init__(self, frames: Iterator[FrameLike]) -> None:
        self._frames = frames
        self.nbytes = 0
        self._taken = 0

    def __iter__(self) -> CountingFrames:
        return self

    def __next__(self) -> FrameLike:
        frame = next(self._frames)
        self.nbytes += frame_nbytes(frame)
        return frame

    def take(self) -> int:
        new, self._taken = self.nbytes - self._taken, self.nbytes
        return new
