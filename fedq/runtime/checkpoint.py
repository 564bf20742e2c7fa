"""Run checkpoints: everything needed to resume a run where it stopped.

Written atomically after every round: the server state (global model, strategy state, downlink
codec, and the privacy ledger when DP is on) and every logical client's state (error-feedback
residuals, bit-policy state, RNG). A checkpoint is a local file the run itself wrote; it is never
read from the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fedq.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> Path:
    path = out_dir / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: Path) -> dict[str, Any]:
    path = out_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: no {CHECKPOINT_FILE} in {out_dir}")
    # weights_only: plain tensors, dicts, lists and numbers; no arbitrary objects.
    state: dict[str, Any] = torch.load(path, weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"--resume: unsupported checkpoint version {state.get('version')}")
    return state
