"""``ModelBundle``: a torch module plus what federated and split code need around it.

Training loops, aggregation and codecs must not care whether a model is a 5k-parameter MLP or a
LoRA-adapted transformer. The bundle gives them one surface: ``make_batch`` turns a data set slice
into model inputs, ``forward`` gives logits, and ``trainable_state`` / ``load_trainable_state`` are
exactly what travels over the wire (all parameters of a small model; only adapters + head of a LoRA
model, as PEFT ships them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedq.data.datasets import AnyDataset, ArrayDataset
from fedq.errors import ConfigError, FedqError

Inputs = torch.Tensor | dict[str, torch.Tensor]


class StateMismatchError(FedqError, ValueError):
    """A state handed to ``load_trainable_state`` does not match the model (names, shapes)."""


def check_state(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], model: str
) -> None:
    """Raise :class:`StateMismatchError` listing missing, unexpected and mis-shaped tensors.

    Loading is all-or-nothing: a partial load would silently mix two models' weights.
    """
    problems = [f"missing {k!r}" for k in sorted(set(expected) - set(got))]
    problems += [f"unexpected {k!r}" for k in sorted(set(got) - set(expected))]
    problems += [
        f"{k!r}: shape {tuple(got[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and got[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 10 else ""
        )
        raise StateMismatchError(f"state does not fit model {model!r}: {shown}")


class ModelBundle:
    """A module whose every parameter trains and travels (the small MLP / CNN case).

    Subclasses (see :mod:`fedq.models.text`) narrow what travels and change how batches are made;
    a causal LM (:mod:`fedq.models.hf`) also changes the loss (:meth:`loss`) and ``task``.
    """

    #: ``classification`` (logits per class, accuracy) or ``causal_lm`` (next-token loss on
    #: the response tokens, perplexity).
    task = "classification"

    def __init__(self, module: nn.Module, *, name: str, num_classes: int) -> None:
        self.module = module
        self.name = name
        self.num_classes = num_classes
        self.input_dim: int | None = None  # set by build_model: what it was built for

    # -- what travels -------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the tensors that train and travel (later steps cannot alias them)."""
        return {n: p.detach().clone() for n, p in self.module.named_parameters()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the model in place (optimizers keep their parameter references)."""
        params = dict(self.module.named_parameters())
        check_state(params, state, self.name)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What an optimizer should step: the parameters with ``requires_grad``."""
        return (p for p in self.module.parameters() if p.requires_grad)

    def num_parameters(self, trainable_only: bool = False) -> int:
        ps = self.trainable_parameters() if trainable_only else self.module.parameters()
        return sum(p.numel() for p in ps)

    # -- batches and forward ------------------------------------------------------------------
    def collate(self, batch: Sequence[tuple[Any, torch.Tensor]]) -> tuple[Inputs, torch.Tensor]:
        """List of ``(x, y)`` examples -> ``(inputs, targets)``; a DataLoader collate_fn."""
        xs = torch.stack([torch.as_tensor(x) for x, _ in batch]).float()
        ys = torch.stack([torch.as_tensor(y) for _, y in batch]).long()
        return xs, ys

    def batch(self, dataset: AnyDataset, idx: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        """:meth:`make_batch` on the model's device (data sets stay on the CPU)."""
        inputs, labels = self.make_batch(dataset, idx)
        dev = self.device
        if dev.type == "cpu":
            return inputs, labels
        if isinstance(inputs, dict):
            return {k: v.to(dev) for k, v in inputs.items()}, labels.to(dev)
        return inputs.to(dev), labels.to(dev)

    def make_batch(self, dataset: AnyDataset, idx: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        """The examples at ``idx`` as model inputs and labels (vectorized for array data)."""
        if not isinstance(dataset, ArrayDataset):
            raise ConfigError(
                f"model {self.name!r} needs array features; data set {dataset.name!r} is text "
                "(use a text model such as 'minilm_lora')"
            )
        return dataset.x[idx].float(), dataset.y[idx]

    def loss(self, inputs: Inputs, labels: torch.Tensor) -> torch.Tensor:
        """The mean training loss of a batch (cross-entropy of the class logits)."""
        import torch.nn.functional as F

        return F.cross_entropy(self.forward(inputs), labels)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """Logits of shape ``(batch, num_classes)``."""
        if isinstance(inputs, dict):
            return self.module(**inputs)
        return self.module(inputs)

    __call__ = forward

    # -- module plumbing ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> ModelBundle:
        self.module.train(mode)
        return self

    def eval(self) -> ModelBundle:
        return self.train(False)

    def to(self, device: torch.device | str) -> ModelBundle:
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, "
            f"params={self.num_parameters()}, trainable={self.num_parameters(True)})"
        )
