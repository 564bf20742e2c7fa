"""Small fully-trained models for feature data: ``mlp`` and ``cnn``.

They make federated experiments on digits / mnist1d run in seconds on a CPU, where every parameter
travels each round, so the codec's compression is measured on whole models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedq.errors import ConfigError
from fedq.models.bundle import ModelBundle
from fedq.models.registry import register_model


def _need_input_dim(name: str, input_dim: int | None) -> int:
    if input_dim is None or input_dim < 1:
        raise ConfigError(
            f"model {name!r} needs input_dim >= 1 (features per example), got {input_dim}"
        )
    return input_dim


class MLP(nn.Module):
    """input_dim -> hidden -> num_classes with ReLU."""

    def __init__(self, input_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two conv layers, then a linear head. Takes flat rows and reshapes them to ``input_shape``
    (``(C, H, W)`` for 2-D, ``(C, L)`` for 1-D), so batches look the same as for the MLP."""

    def __init__(self, input_shape: tuple[int, ...], channels: int, num_classes: int) -> None:
        super().__init__()
        two_d = len(input_shape) == 3
        conv = nn.Conv2d if two_d else nn.Conv1d
        pool = nn.MaxPool2d if two_d else nn.MaxPool1d
        adapt = nn.AdaptiveAvgPool2d(2) if two_d else nn.AdaptiveAvgPool1d(4)
        ks = 3 if two_d else 5
        c0 = input_shape[0]
        self.input_shape = input_shape
        self.features = nn.Sequential(
            conv(c0, channels, ks, padding=ks // 2),
            nn.ReLU(),
            pool(2),
            conv(channels, 2 * channels, ks, padding=ks // 2),
            nn.ReLU(),
            adapt,
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * channels * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        return self.head(self.features(x))


@register_model("mlp")
def build_mlp(
    *, num_classes: int, input_dim: int | None, seed: int, hidden: int = 64
) -> ModelBundle:
    """A one-hidden-layer MLP on flat features."""
    d = _need_input_dim("mlp", input_dim)
    return ModelBundle(MLP(d, hidden, num_classes), name="mlp", num_classes=num_classes)


def cnn_input_shape(input_dim: int) -> tuple[int, ...]:
    """Square feature counts (digits: 64) become ``1 x s x s`` images; others (mnist1d: 40) 1-D."""
    side = math.isqrt(input_dim)
    return (1, side, side) if side * side == input_dim and side >= 4 else (1, input_dim)


@register_model("cnn")
def build_cnn(
    *,
    num_classes: int,
    input_dim: int | None,
    seed: int,
    channels: int = 16,
    input_shape: tuple[int, ...] | list[int] | None = None,
) -> ModelBundle:
    """A small 2-D (digits) or 1-D (mnist1d) conv net; ``input_shape`` overrides the guess."""
    d = _need_input_dim("cnn", input_dim)
    shape = tuple(input_shape) if input_shape is not None else cnn_input_shape(d)
    if len(shape) not in (2, 3) or math.prod(shape) != d:
        raise ConfigError(
            f"model 'cnn': input_shape {shape} must be (C, L) or (C, H, W) with {d} elements"
        )
    return ModelBundle(CNN(shape, channels, num_classes), name="cnn", num_classes=num_classes)
