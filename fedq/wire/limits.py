"""Receiver-side limits on untrusted wire input.

Every size a peer declares (shape, payload size, tensor count) is checked against these
limits before anything is allocated, and a payload buffer is allocated only once a quarter of its
declared size has arrived, so a hostile header cannot make the receiver reserve much more memory
than it gets data for. The defaults are generous for fine-tuning
workloads; a server facing the internet should lower them to what its model actually needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedq.errors import ConfigError


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Limits applied while decoding wire messages (all in elements, counts or bytes)."""

    #: Elements in one tensor (product of its shape).
    max_elements: int = 2**31
    #: Named tensors in one bundle.
    max_tensors: int = 10_000
    #: Dimensions of one tensor.
    max_rank: int = 8
    #: Bytes of one message's serialized bundle (the payload that is chunked over the stream).
    max_payload_bytes: int = 8 << 30
    #: Logical clients one principal may register (a simulation worker hosts many).
    max_clients_per_principal: int = 100_000
    #: Bytes of tensor data per Chunk frame when *sending*; 1 MiB streams fastest over gRPC
    #: (see docs/platform.md §4) and keeps every frame well under gRPC's 4 MiB default message cap.
    chunk_size: int = 1 << 20

    def __post_init__(self) -> None:
        problems = [
            f"wire limit {name} must be a positive integer, got {getattr(self, name)!r}"
            for name in (
                "max_elements",
                "max_tensors",
                "max_rank",
                "max_payload_bytes",
                "max_clients_per_principal",
                "chunk_size",
            )
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0
        ]
        if problems:
            raise ConfigError(problems)
