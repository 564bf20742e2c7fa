"""``fedq shard``: write each client's share of a scenario's data to its own file, the way
``fedq simulate`` partitions it, so that separate sites (``fedq join --data ...``) can try a
deployment with real, disjoint data, and so that a deployment can be checked against the
equivalent simulation (same shards, same rows in the same order).

Array data sets become ``<client id>.npz`` (``x``, ``y``); text data sets ``<client id>.csv``
(``text,label``); instruction data ``<client id>.jsonl`` (the records as read). Labels are
written as class ids.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedq.config import RunConfig
from fedq.data.datasets import InstructionDataset, TextDataset
from fedq.data.instruct import write_jsonl
from fedq.rounds import client_name
from fedq.runtime.preflight import check_names
from fedq.runtime.setup import client_partitions, load_data


def write_shards(cfg: RunConfig, out: Path) -> list[Path]:
    """One file per client of ``cfg`` under ``out``; returns the paths, in client order."""
    check_names(cfg)
    split = load_data(cfg)
    parts = client_partitions(cfg, split.train)
    out.mkdir(parents=True, exist_ok=True)
    train = split.train
    paths = []
    for i, idx in enumerate(parts):
        rows = idx.tolist()
        y = train.y[idx].numpy()
        if isinstance(train, InstructionDataset):
            path = out / f"{client_name(i)}.jsonl"
            write_jsonl([train.records[r] for r in rows], path)
        elif isinstance(train, TextDataset):
            path = out / f"{client_name(i)}.csv"
            with path.open("w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows((train.texts[r], int(lab)) for r, lab in zip(rows, y, strict=True))
        else:
            path = out / f"{client_name(i)}.npz"
            np.savez(path, x=train.x[idx].numpy(), y=y.astype(np.int64))
        paths.append(path)
    return paths
