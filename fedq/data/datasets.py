"""In-memory data set containers shared by every loader, partitioner and model.

Data sets in fedq are small enough to live in memory and are sliced by index tensors (one per
client, see :mod:`fedq.data.partition`), so the containers are plain tensors plus the two facts
every consumer needs: ``num_classes`` (to size heads and label histograms) and ``name`` (for
reports). Text stays raw in :class:`TextDataset` because tokenization belongs to the model that
reads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch
from torch.utils.data import Dataset

from fedq.errors import ConfigError


def _check_labels(labels: torch.Tensor, n: int, num_classes: int, name: str) -> torch.Tensor:
    """Labels must be a 1-D integer tensor in ``[0, num_classes)`` with one entry per example."""
    if labels.dim() != 1 or labels.numel() != n:
        raise ConfigError(
            f"data set {name!r}: need one label per example, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ConfigError(f"data set {name!r}: labels must be integers, got {labels.dtype}")
    if num_classes < 1:
        raise ConfigError(f"data set {name!r}: num_classes must be >= 1, got {num_classes}")
    labels = labels.to(torch.int64)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ConfigError(
            f"data set {name!r}: labels must lie in [0, {num_classes}), "
            f"got [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


class ArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Examples as rows of a tensor: float features, or integer token ids of shape ``(N, L)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, name: str) -> None:
        if x.dim() < 1:
            raise ConfigError(f"data set {name!r}: x must have a leading example dimension")
        self.x = x
        self.y = _check_labels(y, x.shape[0], num_classes, name)
        self.num_classes = num_classes
        self.name = name

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    @property
    def input_dim(self) -> int:
        """Number of features per example (flattened), what ``build_model(input_dim=...)`` wants."""
        return int(self.x[0].numel()) if len(self) else 0

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def subset(self, idx: torch.Tensor) -> ArrayDataset:
        """The examples at ``idx`` (a client's shard); copies, so shards never alias each other."""
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, self.name)


class TextDataset(Dataset[tuple[str, torch.Tensor]]):
    """Raw strings with integer labels; the model tokenizes them (``ModelBundle.make_batch``)."""

    def __init__(self, texts: list[str], labels: torch.Tensor, num_classes: int, name: str) -> None:
        self.texts = list(texts)
        self.y = _check_labels(labels, len(self.texts), num_classes, name)
        self.num_classes = num_classes
        self.name = name

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        return self.texts[i], self.y[i]

    def subset(self, idx: torch.Tensor) -> TextDataset:
        """The examples at ``idx`` (a client's shard)."""
        picked = [self.texts[int(i)] for i in idx.tolist()]
        return TextDataset(picked, self.y[idx], self.num_classes, self.name)


@dataclass(frozen=True, slots=True)
class Record:
    """One example: ``kind`` is ``alpaca``, ``chat`` or ``text``. ``prompt`` is the instruction
    (with its input) or the chat turns before the answer; ``response`` is what the loss is on."""

    kind: str
    response: str
    instruction: str = ""
    input: str = ""
    messages: tuple[tuple[str, str], ...] = ()


class InstructionDataset(Dataset[Record]):
    """Raw records for a causal LM. One ``label`` (class 0) per record so that partitioners,
    holdouts and shards treat it like any other data set (``iid`` is the partition that makes
    sense; label-skewed ones see a single class)."""

    task = "causal_lm"

    def __init__(self, records: Sequence[Record], name: str) -> None:
        self.records = list(records)
        self.y = torch.zeros(len(self.records), dtype=torch.int64)
        self.num_classes = 1
        self.name = name

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    def subset(self, idx: torch.Tensor) -> InstructionDataset:
        return InstructionDataset([self.records[int(i)] for i in idx.tolist()], self.name)


AnyDataset: TypeAlias = ArrayDataset | TextDataset | InstructionDataset


@dataclass(frozen=True)
class DataSplit:
    """A train/test pair. Clients partition ``train``; the server evaluates on ``test``."""

    train: AnyDataset
    test: AnyDataset

    def __post_init__(self) -> None:
        if self.train.num_classes != self.test.num_classes:
            raise ConfigError(
                f"data set {self.train.name!r}: train has {self.train.num_classes} classes, "
                f"test has {self.test.num_classes}"
            )
        if type(self.train) is not type(self.test):
            raise ConfigError(f"data set {self.train.name!r}: train and test differ in kind")

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def capped(self, max_train: int | None, max_test: int | None, seed: int) -> DataSplit:
        """Keep a seeded random subset of at most ``max_train`` / ``max_test`` rows per side.

        Random rather than the first rows, so a capped user file that is sorted by class still
        holds every class; the same seed keeps the same rows in every process.
        """
        problems = [
            f"data set {self.name!r}: {k} must be >= 1 or None, got {v}"
            for k, v in (("max_train", max_train), ("max_test", max_test))
            if v is not None and v < 1
        ]
        if problems:
            raise ConfigError(problems)
        rng = np.random.default_rng(seed)

        def cap(ds: AnyDataset, n: int | None) -> AnyDataset:
            if n is None or n >= len(ds):
                return ds
            return ds.subset(torch.from_numpy(rng.permutation(len(ds))[:n]))

        return DataSplit(cap(self.train, max_train), cap(self.test, max_test))

    @property
    def name(self) -> str:
        return self.train.name


@dataclass(frozen=True, slots=True)
class Shard:
    """One logical client's local data: its rows ``idx`` of ``data`` (a simulated client's
    partition of the run's data set, or all of a ``fedq join`` site's own data)."""

    data: AnyDataset
    idx: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.idx.numel())

    @staticmethod
    def whole(data: AnyDataset) -> Shard:
        return Shard(data, torch.arange(len(data)))

    @staticmethod
    def local(data: AnyDataset, parts: Mapping[str, torch.Tensor]) -> dict[str, Shard]:
        """The shards ``parts`` (client id -> its rows of ``data``) over one copy of just those
        rows, in the same order: a process that hosts some of the clients keeps their data and
        not the whole data set."""
        if not parts:
            return {}
        held = data.subset(torch.cat([idx.reshape(-1) for idx in parts.values()]))
        out: dict[str, Shard] = {}
        start = 0
        for cid, idx in parts.items():
            out[cid] = Shard(held, torch.arange(start, start + idx.numel()))
            start += idx.numel()
        return out
