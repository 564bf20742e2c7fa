"""Test-wide environment: set before anything imports triton, transformers or ray."""

import os
from collections.abc import Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Every test runs with one intra-op thread: the models are small, so one thread is about as
    fast as two, and unlike two it does not slow down tenfold when other processes share the
    cores (OpenMP workers spin while waiting). Ray workers and subprocesses set their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
