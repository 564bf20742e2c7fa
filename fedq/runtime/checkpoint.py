"""Run checkpoints: everything needed to resume a run where it stopped.

``checkpoint.pt`` is written after every round: the next round, the server's state (the engine's
run id and roster; the workload: model, strategy, codecs, optimizer and gate state, privacy ledger)
and, in a simulation, every client's state (error-feedback residuals, bit-policy state, RNGs,
accountants); and the bytes the clients counted so far (``fedq serve``: per client), so totals
add up across a resume. ``privacy.pt`` is written when a round opens, right after its privacy is
charged and before anything is released: a resume takes whichever ledger is further along, so
privacy spent in a round that was open when the run died is never forgotten (it is charged again
when the round runs again: conservative, never under-counted).

Both are written atomically (a temporary file, fsync, rename, fsync of the folder): a crash leaves
the previous file or the new one, never a torn one. A file that is corrupt or truncated anyway
(disk trouble, a copy gone wrong) is a clear error, never a silent restart from round 0. These are
local files the run itself wrote; they are never read from the network.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from fedq.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
PRIVACY_FILE = "privacy.pt"
CHECKPOINT_VERSION = 2


def _write_atomic(path: Path, state: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return path


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        # weights_only: plain tensors, dicts, lists and numbers; no arbitrary objects.
        state = torch.load(path, weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"--resume: {path} is corrupt or truncated and cannot be read ({type(e).__name__}: "
            f"{str(e)[:200]}); {what}"
        ) from e
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise ConfigError(f"--resume: {path}: unsupported checkpoint version {version} "
                          f"(this fedq writes {CHECKPOINT_VERSION})")  # fmt: skip
    return state


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> Path:
    return _write_atomic(out_dir / CHECKPOINT_FILE, state)


def save_privacy_journal(out_dir: Path, round_index: int, ledger: dict[str, Any]) -> Path:
    """The privacy ledger right after round ``round_index`` was charged."""
    return _write_atomic(out_dir / PRIVACY_FILE, {"round": round_index, "ledger": ledger})


def load_checkpoint(out_dir: Path) -> dict[str, Any]:
    """The run's last checkpoint, with ``ledger_journal`` set when a later round was charged
    (``{"round": r, "ledger": ...}``, to be loaded over the checkpoint's ledger)."""
    path = out_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: no {CHECKPOINT_FILE} in {out_dir}")
    state = _read(path, "restore it from a copy or start a new run")
    journal = out_dir / PRIVACY_FILE
    state["ledger_journal"] = None
    if journal.is_file():
        j = _read(journal, "the privacy spent since the last round is unknown; restore it")
        if int(j["round"]) >= int(state["next_round"]):
            state["ledger_journal"] = j
    return state
