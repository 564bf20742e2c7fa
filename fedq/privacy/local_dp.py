"""Client-side DP-SGD through Opacus (Abadi et al. 2016, "Deep learning with differential privacy",
arXiv:1607.00133; Opacus: Yousefpour et al. 2021, arXiv:2109.12298).

Each step clips every example's gradient to L2 norm ``max_grad_norm``, sums, adds
``N(0, (noise_multiplier * max_grad_norm)^2)`` and averages over the expected batch size; batches
are Poisson samples (each example independently with probability ``q``). One local round of
``steps`` such steps is accounted as ``steps`` Poisson-subsampled Gaussian releases at rate ``q``
with :class:`fedq.privacy.GaussianAccountant` (example-level DP for the client's data).

``opacus`` is imported inside the functions, never at import time. Compatibility is checked before
wrapping: Opacus's ``ModuleValidator`` plus the two cases it misses (docs/platform.md §5), trainable
embeddings and PEFT LoRA adapters on embeddings, which fail later with "Per sample gradient is not
initialized" or a ``stack`` size error because HF models broadcast ``position_ids``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedq.errors import ConfigError, UnsupportedError
from fedq.privacy.mechanisms import warn_insecure_rng

GradSampleMode = Literal["hooks", "ghost"]
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ghost")
log = logging.getLogger(__name__)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def check_dp_compatible(module: nn.Module, *, allow_trainable_embeddings: bool = False) -> None:
    """Raise :class:`~fedq.errors.UnsupportedError` naming each layer DP-SGD cannot handle.

    Runs ``opacus.validators.ModuleValidator.validate(strict=False)`` (BatchNorm, ...), then rejects
    PEFT LoRA adapters on embeddings and, unless ``allow_trainable_embeddings``, any trainable
    ``nn.Embedding`` (a plain model that feeds batch-first ids to its embedding works in Opacus;
    HF transformers do not, since they broadcast ``position_ids``).
    """
    from opacus.validators import ModuleValidator

    problems = [str(e) for e in ModuleValidator.validate(module, strict=False)]
    flagged = [
        f"{name} ({type(sub).__name__})"
        for name, sub in module.named_modules()
        if type(sub) in ModuleValidator.VALIDATORS and _trainable(sub)
    ]
    if flagged:
        problems.append(
            f"layers flagged by Opacus's ModuleValidator: {', '.join(flagged)} (replace them, e.g. "
            "opacus.validators.ModuleValidator.fix turns BatchNorm into GroupNorm, or freeze them)"
        )
    for name, sub in module.named_modules():
        lora_emb = [
            f"{attr}.{k}"
            for attr in ("lora_embedding_A", "lora_embedding_B")
            for k, p in getattr(sub, attr, {}).items()
            if isinstance(p, nn.Parameter) and p.requires_grad
        ]
        if lora_emb:
            problems.append(
                f"layer {name!r} has trainable LoRA adapters on an embedding "
                f"({', '.join(lora_emb)}); "
                "Opacus computes no per-example gradients for them. Drop the embedding from LoRA "
                "target_modules (e.g. target only query/value) or freeze it"
            )
        elif isinstance(sub, nn.Embedding) and _trainable(sub) and not allow_trainable_embeddings:
            problems.append(
                f"layer {name!r} is a trainable nn.Embedding; with DP-SGD freeze it "
                "(requires_grad=False) or train it through LoRA on other layers. For full "
                "fine-tuning of BERT/GPT-2 pass position_ids/token_type_ids repeated to the batch "
                "size and set allow_trainable_embeddings=True"
            )
    if problems:
        raise UnsupportedError(
            "model is not compatible with DP-SGD (Opacus):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns. Use ``module``, ``optimizer``, ``data_loader`` (and, in
    ghost mode, ``criterion``) instead of the originals; call :meth:`close` to detach the hooks."""

    module: nn.Module
    optimizer: Any  # opacus DPOptimizer
    data_loader: DataLoader[Any]
    criterion: Any | None  # opacus DPLossFastGradientClipping in ghost mode, else None
    engine: Any  # opacus PrivacyEngine (its accountant saw every step)
    sample_rate: float
    grad_sample_mode: str

    def close(self) -> None:
        """Remove Opacus hooks and per-sample gradient attributes from the wrapped module."""
        cleanup = getattr(self.module, "cleanup", None) or getattr(self.module, "_close", None)
        if cleanup is not None:
            cleanup()


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: GradSampleMode = "hooks",
    criterion: nn.Module | None = None,
    accountant: str = "rdp",
    noise_generator: torch.Generator | None = None,
    poisson_sampling: bool = True,
    allow_trainable_embeddings: bool = False,
) -> PrivateTraining:
    """Wrap (module, optimizer, data loader) for DP-SGD with ``opacus.PrivacyEngine``.

    Puts the module in train mode first (``from_pretrained`` returns eval mode, which Opacus
    rejects), checks compatibility (:func:`check_dp_compatible`), and handles ghost clipping
    (Li et al. 2022, arXiv:2110.05679), whose ``make_private`` needs ``criterion=`` and returns a
    wrapped criterion as a fourth value; ``criterion`` defaults to mean cross-entropy there.
    ``noise_generator`` seeds the Gaussian noise; Poisson sampling uses ``data_loader.generator``.
    """
    from opacus import PrivacyEngine

    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"grad_sample_mode: unknown {grad_sample_mode!r}; "
            f"allowed: {', '.join(GRAD_SAMPLE_MODES)}"
        )
    if not (noise_multiplier > 0 and max_grad_norm > 0):
        raise ConfigError(
            f"DP-SGD needs noise_multiplier > 0 and max_grad_norm > 0, got "
            f"{noise_multiplier} and {max_grad_norm}"
        )
    module.train()
    check_dp_compatible(module, allow_trainable_embeddings=allow_trainable_embeddings)
    warn_insecure_rng()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)
    kw: dict[str, Any] = {
        "module": module,
        "optimizer": optimizer,
        "data_loader": data_loader,
        "noise_multiplier": float(noise_multiplier),
        "max_grad_norm": float(max_grad_norm),
        "grad_sample_mode": grad_sample_mode,
        "poisson_sampling": poisson_sampling,
        "noise_generator": noise_generator,
    }
    if grad_sample_mode == "ghost":
        crit = criterion if criterion is not None else nn.CrossEntropyLoss(reduction="mean")
        gsm, dp_opt, dp_crit, dl = engine.make_private(criterion=crit, **kw)
    else:
        gsm, dp_opt, dl = engine.make_private(**kw)
        dp_crit = None
    return PrivateTraining(
        module=gsm,
        optimizer=dp_opt,
        data_loader=dl,
        criterion=dp_crit,
        engine=engine,
        sample_rate=1.0 / len(dl),
        grad_sample_mode=grad_sample_mode,
    )


@dataclass(frozen=True)
class DPTrainResult:
    """One client's DP-SGD round: account ``steps`` releases at (noise_multiplier, sample_rate)."""

    loss: float  # mean training loss over non-empty batches (NaN if every batch was empty)
    steps: int  # optimizer steps taken, empty Poisson batches included (each is a noisy release)
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float


def _noise_only_step(private: PrivateTraining) -> None:
    """An empty Poisson batch still releases a noisy update (skipping it would leak that the
    batch was empty): zero clipped sum, plus noise, as Opacus does for empty batches."""
    for p in private.optimizer.params:
        if private.grad_sample_mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    private.optimizer.step()


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


@contextlib.contextmanager
def private_session(private: PrivateTraining) -> Iterator[PrivateTraining]:
    try:
        yield private
    finally:
        private.close()


def dp_local_train(
    bundle: Any,
    data: Any,
    idx: torch.Tensor,
    *,
    batch_size: int,
    epochs: int,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr: float = 0.1,
    grad_sample_mode: GradSampleMode = "hooks",
) -> DPTrainResult:
    """DP-SGD on a fedq ``ModelBundle`` over the client's examples ``data[idx]``, in place.

    Poisson sampling at ``q = 1 / ceil(n / batch_size)`` (Opacus's rate for a loader of that many
    batches), ``ceil(n / batch_size)`` steps per epoch, cross-entropy on ``bundle.forward``; both
    the sampling and the noise are drawn from ``generator`` (reproducible; see
    :func:`fedq.privacy.warn_insecure_rng`). ``optimizer_factory(params)`` builds the optimizer
    (default SGD at ``lr``). Hooks are removed afterwards, so the bundle is a plain model again.
    """
    if batch_size < 1 or epochs < 1 or idx.numel() < 1:
        raise ConfigError(
            f"dp_local_train needs batch_size >= 1, epochs >= 1 and examples, got {batch_size}, "
            f"{epochs}, {idx.numel()}"
        )
    model = bundle.module
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_factory(params) if optimizer_factory else torch.optim.SGD(params, lr=lr)
    loader_gen = torch.Generator().manual_seed(_seed_from(generator))
    noise_gen = torch.Generator().manual_seed(_seed_from(generator))
    loader = DataLoader(TensorDataset(idx.long()), batch_size=batch_size, generator=loader_gen)
    private = make_private(
        model,
        opt,
        loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=grad_sample_mode,
        noise_generator=noise_gen,
    )
    total, counted, steps = 0.0, 0, 0
    with private_session(private):
        for _ in range(epochs):
            for (b,) in private.data_loader:
                private.optimizer.zero_grad(set_to_none=True)
                if b.numel() == 0:
                    _noise_only_step(private)
                    steps += 1
                    continue
                inputs, labels = bundle.batch(data, b)
                logits = bundle.forward(inputs)
                if private.criterion is not None:
                    loss = private.criterion(logits, labels)
                else:
                    loss = F.cross_entropy(logits, labels)
                loss.backward()
                private.optimizer.step()
                total += float(loss.item())
                counted += 1
                steps += 1
        private.optimizer.zero_grad(set_to_none=True)
    return DPTrainResult(
        loss=total / counted if counted else float("nan"),
        steps=steps,
        sample_rate=private.sample_rate,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
    )
