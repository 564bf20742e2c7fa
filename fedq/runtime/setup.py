"""Deterministic set-up shared by the server, every worker and the driver.

Each process loads the data and builds the model itself from the resolved config (same seed, same
result), so no tensors travel through Ray: everything that crosses a process boundary at run time
goes through the wire codec and the transport, and is counted.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fedq.config import RunConfig
from fedq.errors import ConfigError


def torch_device(name: str) -> torch.device:
    """``runtime.device`` as a torch device: ``auto`` takes CUDA when torch sees a GPU; ``cuda``
    without one is a :class:`~fedq.errors.ConfigError` (not a silent fall-back to the CPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "runtime.device: 'cuda' asked for, but torch sees no CUDA GPU "
            f"(torch {torch.__version__}); use 'cpu' or 'auto'"
        )
    return torch.device(name)


def quiet_process(threads: int) -> None:
    """Per-process set-up of a host (server or client worker): torch threads, no tokenizer pool."""
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def preload_optimizers() -> None:
    """Build and drop one optimizer. A process's first torch optimizer imports ``torch._dynamo``
    (about a second of CPU on a small machine); a client process does it while it starts, so its
    first round does not pay it."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def load_data(cfg: RunConfig, name: str | None = None) -> Any:
    """The run's data set (or ``name``, e.g. a server's own evaluation data, with the run's
    options)."""
    from fedq.data import load_dataset

    d = cfg.data
    extra = {} if d.num_samples is None else {"num_samples": d.num_samples}
    return load_dataset(
        name or d.name, seed=cfg.seed, max_train=d.max_train, max_test=d.max_test, **extra
    )


def client_partitions(cfg: RunConfig, train: Any) -> list[torch.Tensor]:
    from fedq.data import partition

    d = cfg.data
    return partition(
        train.y,
        cfg.rounds.num_clients,
        d.partition,
        seed=cfg.seed,
        alpha=d.alpha,
        classes_per_client=d.classes_per_client,
    )


def build_bundle(cfg: RunConfig, train: Any) -> Any:
    from fedq.modes.federated import build_bundle as build

    input_dim = int(train.x.shape[1]) if hasattr(train, "x") and train.x.dim() == 2 else 0
    return build(cfg, int(train.num_classes), input_dim)


def pin_base(cfg: RunConfig) -> RunConfig:
    """The server's config with ``model.base_sha256`` set to its base's fingerprint (a model
    with a Hugging Face base); a pinned value that differs from the base it holds is an error."""
    import dataclasses

    from fedq.models.sources import base_fingerprint

    found = base_fingerprint(cfg.model.name)
    if found is None:
        return cfg
    pinned = cfg.model.base_sha256
    if pinned and pinned != found:
        raise ConfigError(
            f"model.base_sha256: the scenario pins base {pinned[:16]}..., but {cfg.model.name!r} "
            f"on this machine is {found[:16]}...; point model.name at the pinned weights"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base_sha256=found))


def check_base(cfg: RunConfig) -> None:
    """Before a client trains: its own copy of the base must be the one the server trains on
    (``model.base_sha256``); a different one is refused, naming both."""
    from fedq.errors import FedqError
    from fedq.models.sources import base_fingerprint

    want = cfg.model.base_sha256
    if not want:
        return
    have = base_fingerprint(cfg.model.name)
    if have != want:
        where = cfg.model.name[3:] if cfg.model.name.startswith("hf:") else cfg.model.name
        raise FedqError(
            f"this site's base model ({where}, sha256 {str(have)[:16]}...) is not the one the "
            f"server trains on (sha256 {want[:16]}...): every site needs the same base weights "
            "(copy the server's model directory, or pass it with --model PATH)"
        )
