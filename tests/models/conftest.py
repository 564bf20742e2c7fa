"""Model tests run with one intra-op thread.

The models here are small: one thread is about as fast as two, and unlike two it does not slow
down tenfold when other processes share the cores (OpenMP workers spin while waiting).
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
