"""Reproducible randomness for a party's forward passes (dropout masks).

Dropout draws from torch's global generator. :func:`seeded_forward` runs a block of work with the
global generator seeded from (run seed, party, step) and restores it afterwards, so a step's masks
do not depend on what else ran before it in the process: runs are reproducible, resumable, and the
same whichever process hosts which client. A process-wide lock keeps two threads of one process
(an in-process simulation) from interleaving their seeded blocks.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Iterator

import torch

_LOCK = threading.RLock()


def rng_seed(seed: int, who: str, step: int) -> int:
    """The generator seed of party ``who`` at ``step`` of a run seeded ``seed``."""
    return (seed * 1_000_003 + zlib.crc32(who.encode()) * 7_919 + step) % 2**63


@contextlib.contextmanager
def seeded_forward(seed: int, who: str, step: int, device: torch.device | str) -> Iterator[None]:
    """Run the block with the global generator(s) seeded by ``rng_seed(seed, who, step)``."""
    dev = torch.device(device)
    devices = [dev] if dev.type == "cuda" else []
    with _LOCK, torch.random.fork_rng(devices=devices):
        torch.manual_seed(rng_seed(seed, who, step))
        yield
