"""Split tests: tiny random models, one intra-op thread (no OpenMP spinning on a 2-core box).

``kit`` gives the tests the tiny set-up helpers (config, model, data, shards) below.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fedq.config import RunConfig, config_from_dict
from fedq.data.datasets import Shard
from fedq.rounds import client_name
from fedq.runtime.setup import client_partitions, load_data
from fedq.split.codecs import boundary_factory
from fedq.split.models import SplitModel, build_split_model


def tiny_cfg(
    model: str = "tiny_bert_lora", rounds: dict[str, Any] | None = None, **split: Any
) -> RunConfig:
    raw = {
        "mode": "split",
        "seed": 0,
        "data": {"name": "rotten_tomatoes", "partition": "iid", "max_train": 128, "max_test": 32},
        "model": {"name": model, "hidden": 32, "lora_r": 4, "max_length": 24},
        "train": {"batch_size": 8, "lr": 0.01, "optimizer": "adamw"},
        "rounds": {"count": 2, "num_clients": 2, "clients_per_round": 2, **(rounds or {})},
        "split": {"cut": 2, "tiny_layers": 4, "local_steps": 2, **split},
        "runtime": {"backend": "inprocess", "workers": 1},
    }
    return config_from_dict(raw)


def build(cfg: RunConfig) -> SplitModel:
    sc, m = cfg.split, cfg.model
    return build_split_model(
        m.name,
        cut=sc.cut,
        num_classes=2,
        seed=cfg.seed,
        lora_r=m.lora_r,
        max_length=m.max_length,
        hidden=m.hidden,
        tiny_layers=sc.tiny_layers,
        make_boundary=boundary_factory(sc, m.hidden),
    )


def data(cfg: RunConfig) -> tuple[Any, list[Any]]:
    split = load_data(cfg)
    return split, client_partitions(cfg, split.train)


def shards(cfg: RunConfig, split: Any, parts: list[Any]) -> dict[str, Shard]:
    """Every client's shard, by client id."""
    return {client_name(i): Shard(split.train, p) for i, p in enumerate(parts)}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kit() -> SimpleNamespace:
    return SimpleNamespace(tiny_cfg=tiny_cfg, build=build, data=data, shards=shards)
