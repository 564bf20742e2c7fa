"""Who takes part: client names, the per-(client, round) seed, and the seeded selection.

A client's randomness is seeded from its position in the server's roster (its index), never from
which process runs it, so the same run gives the same result however clients are hosted (one
`fedq join` per site, or many logical clients on a few simulation workers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def client_name(index: int) -> str:
    """The id of simulated client ``index`` (and of ``fedq certs``' default clients)."""
    return f"client-{index}"


def client_seed(seed: int, index: int, round_index: int) -> int:
    """Seed of client ``index``'s randomness in round ``round_index`` (batches, noise, rounding)."""
    return (seed * 1_000_003 + index * 7_919 + round_index * 104_729) % (2**63 - 1)


def select_clients(round_index: int, pool: Sequence[int], k: int, seed: int) -> list[int]:
    """``k`` distinct clients of ``pool`` (roster indices), reproducible from (seed, round), in
    ascending order. With every client available this is the same draw for any pool order."""
    pool = sorted(pool)
    g = torch.Generator().manual_seed(seed * 1_000_003 + round_index)
    order = torch.randperm(len(pool), generator=g)[:k].tolist()
    return sorted(pool[i] for i in order)
