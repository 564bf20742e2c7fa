"""Admission control for what a server holds at once: memory of in-flight uploads, calls per
principal.

An upload (a ``PushUpdate`` message, a split step's activations) is admitted once its header
arrives, for the payload size it declares, before any of its chunks are read. If the budget is in
use by other uploads, or the message alone is larger than the budget, the call ends at once with
RESOURCE_EXHAUSTED, and fedq's client retries it after a jittered backoff (the budget refusal
says so) within the call's deadline. Refusing at once rather than holding the call open is what
keeps memory bounded: a stream the server is not reading still fills gRPC's receive window, which
grows with the link's bandwidth-delay product to megabytes per stream, so a crowd of waiting
uploads would hold far more than the budget (``fedq bench flood``; ``upload_wait_s`` > 0 trades
that memory for fewer retries). The budget is released when the handler is done with the message.
A header that overstates its size only makes its own admission more expensive: the payload must
still match it chunk by chunk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fedq.errors import ConfigError, ResourceExhausted

#: Part of the reason of a refusal that a retry may overcome (the budget is busy, not too small).
BUSY = "the server's upload budget is busy"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one server holds at once (the wire decoding limits are :class:`WireLimits`)."""

    #: Bytes of upload payload held at once, over all callers (``runtime.upload_budget_mb``).
    upload_budget_bytes: int = 1 << 30
    #: How long an upload waits for the budget before RESOURCE_EXHAUSTED (module docstring).
    upload_wait_s: float = 0.0
    #: Calls one authenticated principal may have in flight (its work stream, a split stream
    #: and a task or update at a time is what fedq's own clients use).
    max_calls_per_principal: int = 4

    def __post_init__(self) -> None:
        if self.upload_budget_bytes < 1 or self.max_calls_per_principal < 1:
            raise ConfigError("server limits must be positive")
        if self.upload_wait_s < 0:
            raise ConfigError(f"upload_wait_s must be >= 0, got {self.upload_wait_s}")


class UploadBudget:
    """Bytes of upload payload the server may hold at once (thread-safe)."""

    def __init__(self, total_bytes: int, wait_s: float = 0.0) -> None:
        if total_bytes <= 0:
            raise ValueError(f"upload budget must be positive, got {total_bytes}")
        self.total = int(total_bytes)
        self.wait_s = float(wait_s)
        self._cv = threading.Condition()
        self.in_use = 0
        self.peak = 0  # the most held at once since the server started
        self.refused = 0  # admissions refused (too large, or the budget stayed full)

    def acquire(self, nbytes: int, who: str, timeout: float | None = None) -> int:
        """Reserve ``nbytes`` for ``who``'s upload, waiting up to ``timeout`` (default
        ``wait_s``) for other uploads to finish; :class:`ResourceExhausted` otherwise."""
        n = max(int(nbytes), 0)
        if n > self.total:
            with self._cv:
                self.refused += 1
            raise ResourceExhausted(
                f"{who}: a message of {_mib(n)} exceeds the server's upload budget of "
                f"{_mib(self.total)} (runtime.upload_budget_mb)"
            )
        end = time.monotonic() + (self.wait_s if timeout is None else max(timeout, 0.0))
        with self._cv:
            while self.in_use + n > self.total:
                left = end - time.monotonic()
                if left <= 0:
                    self.refused += 1
                    raise ResourceExhausted(
                        f"{who}: {BUSY} ({_mib(self.in_use)} of {_mib(self.total)} in use by other "
                        "uploads); retry after a backoff"
                    )
                self._cv.wait(left)
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
        return n

    def release(self, nbytes: int) -> None:
        with self._cv:
            self.in_use -= nbytes
            self._cv.notify_all()


class CallSlots:
    """At most ``per_principal`` calls in flight per authenticated principal."""

    def __init__(self, per_principal: int) -> None:
        self.per_principal = int(per_principal)
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}

    @contextmanager
    def hold(self, principal: str) -> Iterator[None]:
        with self._lock:
            n = self._calls.get(principal, 0)
            if n >= self.per_principal:
                raise ResourceExhausted(
                    f"{principal[:80]} has {n} calls in flight, the most one caller may have"
                )
            self._calls[principal] = n + 1
        try:
            yield
        finally:
            with self._lock:
                self._calls[principal] -= 1
                if not self._calls[principal]:
                    del self._calls[principal]

    def in_flight(self, principal: str) -> int:
        with self._lock:
            return self._calls.get(principal, 0)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
