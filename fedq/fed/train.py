"""Local training and evaluation loops shared by clients (training) and the server (evaluation)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from fedq.config import TrainConfig
from fedq.models.optim import make_optimizer as _make_optimizer


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``train``'s optimizer (its mode defaults are resolved when the config loads)."""
    assert cfg.optimizer is not None and cfg.weight_decay is not None
    return _make_optimizer(
        params, cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def batches(
    idx: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    perm = idx[torch.randperm(idx.numel(), generator=generator)]
    for start in range(0, perm.numel(), batch_size):
        yield perm[start : start + batch_size]


def local_train(
    bundle: Any,
    data: Any,
    idx: torch.Tensor,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
    grad_clip_l1: float | None = None,
    smoothness: Any = None,
) -> tuple[float, int]:
    """Train ``bundle`` in place on ``data[idx]``; returns (mean training loss, steps).

    With ``proximal_mu > 0`` adds the FedProx term (mu/2)||w - w_start||^2 over trainable weights.
    ``grad_clip_l1`` clips every mini-batch gradient to that L1 norm and ``smoothness`` (a
    :class:`fedq.privacy.SmoothnessEstimator`) records (weights, grads) per batch index: both are
    the Laplace calibration of Ardic & Genc (docs/algorithms.md §2.3, ``laplace_calibration:
    paper``).
    """
    model = bundle.module
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    opt = make_optimizer(params, cfg)
    total, steps = 0.0, 0
    for _ in range(cfg.local_epochs):
        for batch_index, b in enumerate(batches(idx, cfg.batch_size, generator)):
            inputs, labels = bundle.batch(data, b)
            loss = bundle.loss(inputs, labels)
            if proximal_mu > 0:
                prox = sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip_l1 is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip_l1, norm_type=1.0)
            if smoothness is not None:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                smoothness.record(batch_index, [p.detach() for p in params], grads)
            opt.step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1), steps


@torch.no_grad()
def evaluation(bundle: Any, data: Any, *, batch_size: int = 256) -> dict[str, Any]:
    """``accuracy``, mean cross-entropy ``loss`` and ``predictions`` (how many rows the model
    assigns to each class) of ``bundle`` on all of ``data``. The histogram shows a model that
    predicts one class for everything (:func:`collapsed_class`), whatever its accuracy. A causal
    LM reports its held-out ``loss`` and ``perplexity`` instead (:func:`lm_evaluation`)."""
    if bundle.task == "causal_lm":
        return lm_evaluation(bundle, data, batch_size=min(batch_size, 16))
    model = bundle.module
    was_training = model.training
    model.eval()
    n = len(data)
    correct, loss_sum = 0, 0.0
    counts = torch.zeros(int(data.num_classes), dtype=torch.int64)
    for start in range(0, n, batch_size):
        b = torch.arange(start, min(start + batch_size, n))
        inputs, labels = bundle.batch(data, b)
        logits = bundle.forward(inputs)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        predicted = logits.argmax(dim=-1)
        correct += int((predicted == labels).sum())
        counts += torch.bincount(predicted.cpu(), minlength=counts.numel())[: counts.numel()]
    model.train(was_training)
    return {
        "accuracy": correct / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "predictions": counts.tolist(),
    }


@torch.no_grad()
def lm_evaluation(bundle: Any, data: Any, *, batch_size: int = 16) -> dict[str, Any]:
    """Mean next-token cross-entropy ``loss`` over every response token of ``data`` (each token
    weighs the same, whatever its record's length) and ``perplexity = exp(loss)``."""
    from fedq.models.hf import token_losses

    model = bundle.module
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = len(data)
    for start in range(0, n, batch_size):
        inputs, labels = bundle.batch(data, torch.arange(start, min(start + batch_size, n)))
        own = getattr(bundle, "token_losses", None)  # a causal LM's: logits where labelled
        s, c = own(inputs, labels) if own else token_losses(bundle.forward(inputs), labels)
        total += float(s)
        count += c
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def evaluate(bundle: Any, data: Any, *, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of ``bundle`` on all of ``data``."""
    out = evaluation(bundle, data, batch_size=batch_size)
    return out["accuracy"], out["loss"]


def collapsed_class(predictions: list[int]) -> int | None:
    """The one class a model predicts for every row (of two or more), else None."""
    used = [c for c, k in enumerate(predictions) if k > 0]
    return used[0] if len(used) == 1 and sum(predictions) > 1 else None
