"""The local optimizer of a party's trainable weights, by name (``train.optimizer``): federated
clients and both halves of a split model build theirs here."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedq.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """``sgd`` (with ``momentum``), ``adam`` or ``adamw``, all with ``weight_decay``."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"train.optimizer: unknown {name!r}; allowed: {', '.join(OPTIMIZERS)}")
