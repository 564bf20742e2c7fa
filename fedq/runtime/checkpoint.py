"""Run checkpoints: everything needed to resume a run where it stopped.

``checkpoint.pt`` is written after every round: the next round, the server's state (the engine's
run id and roster; the workload: model, strategy, codecs, optimizer and gate state, privacy ledger)
and, in a simulation, the list of client-state segments that together hold every client's state
(error-feedback residuals, bit-policy state, RNGs, accountants); and the bytes the clients counted
so far (``fedq serve``: per client), so totals add up across a resume; and the round's log
lines, written to the logs after the checkpoint (:mod:`fedq.runtime.recorder`). A round adds one
segment, ``clients-<next round>.pt``, with the states that changed in it (the selected
clients'), so what a round writes does not grow with the number of clients; when the segments
hold more than twice as many entries as there are distinct clients, they are merged into one
(:class:`ClientStateLog`).
``privacy.pt`` is written when a round opens, right after its privacy is charged and before
anything is released: a resume takes whichever ledger is further along, so privacy spent in a
round that was open when the run died is never forgotten (it is charged again when the round runs
again: conservative, never under-counted).

Every file is written atomically (a temporary file, fsync, rename, fsync of the folder): a crash
leaves the previous file or the new one, never a torn one; a segment counts only once the
``checkpoint.pt`` that lists it is written, and unlisted ones are removed after that. A file that
is corrupt or truncated anyway (disk trouble, a copy gone wrong) is a clear error, never a silent
restart from round 0. These are local files the run itself wrote; they are never read from the
network.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedq.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
PRIVACY_FILE = "privacy.pt"
CHECKPOINT_VERSION = 3
#: Versions this fedq reads (2: every client's state inside checkpoint.pt).
READABLE_VERSIONS = (2, 3)
SEGMENT_PREFIX = "clients-"


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
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ConfigError(
            f"--resume: {path} is corrupt or truncated and cannot be read ({type(e).__name__}: "
            f"{str(e)[:200]}); {what}"
        ) from e
    if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
        version = state.get("version") if isinstance(state, dict) else None
        raise ConfigError(
            f"--resume: {path}: unsupported checkpoint version {version} "
            f"(this fedq writes {CHECKPOINT_VERSION})"
        )
    return state


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> Path:
    return _write_atomic(out_dir / CHECKPOINT_FILE, state)


def save_privacy_journal(out_dir: Path, round_index: int, ledger: dict[str, Any]) -> Path:
    """The privacy ledger right after round ``round_index`` was charged."""
    return _write_atomic(out_dir / PRIVACY_FILE, {"round": round_index, "ledger": ledger})


def load_checkpoint(out_dir: Path) -> dict[str, Any]:
    """The run's last checkpoint, with ``clients`` holding every client's state (from its
    segments) and ``ledger_journal`` set when a later round was charged (``{"round": r, "ledger":
    ...}``, to be loaded over the checkpoint's ledger)."""
    path = out_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: no {CHECKPOINT_FILE} in {out_dir}")
    state = _read(path, "restore it from a copy or start a new run")
    clients = dict(state.get("clients", {}))
    for seg in state.get("client_segments", []):
        clients.update(_read_segment(out_dir, str(seg["file"])))
    state["clients"] = clients
    journal = out_dir / PRIVACY_FILE
    state["ledger_journal"] = None
    if journal.is_file():
        j = _read(journal, "the privacy spent since the last round is unknown; restore it")
        if int(j["round"]) >= int(state["next_round"]):
            state["ledger_journal"] = j
    return state


def _read_segment(out_dir: Path, name: str) -> dict[str, Any]:
    path = out_dir / name
    if not path.is_file():
        raise ConfigError(
            f"--resume: {path} is missing: {CHECKPOINT_FILE} lists it; restore it "
            "from a copy or start a new run"
        )
    return dict(_read(path, "restore it from a copy or start a new run")["clients"])


class ClientStateLog:
    """Writes the client states of a run's checkpoints as segments (module docstring).

    ``segments`` / ``clients``: what the checkpoint being resumed lists and holds (its
    ``client_segments`` and ``clients``). :meth:`append` writes a round's changed states and
    returns the list to put in ``checkpoint.pt`` as ``client_segments``; :meth:`prune` removes
    the segments that list no longer names, once that checkpoint is written."""

    def __init__(
        self,
        out_dir: Path,
        segments: Iterable[Mapping[str, Any]] = (),
        clients: Mapping[str, Any] | None = None,
    ) -> None:
        self.out = out_dir
        self.segments: list[dict[str, Any]] = [
            {"file": str(s["file"]), "entries": int(s["entries"])} for s in segments
        ]
        clients = clients or {}
        self.ids = set(clients)
        # states held inline by a version-2 checkpoint go into the first segment written
        self._pending = {} if self.segments else dict(clients)

    @property
    def entries(self) -> int:
        return sum(s["entries"] for s in self.segments)

    def append(self, next_round: int, changed: Mapping[str, Any]) -> list[dict[str, Any]]:
        states = {**self._pending, **changed}
        if not states:
            return list(self.segments)
        self.ids.update(states)
        name = f"{SEGMENT_PREFIX}{next_round}.pt"
        if self.entries + len(states) > 2 * len(self.ids):  # mostly superseded: merge them
            merged: dict[str, Any] = {}
            for seg in self.segments:
                merged.update(_read_segment(self.out, seg["file"]))
            merged.update(states)
            states, self.segments = merged, []
        _write_atomic(self.out / name, {"round": next_round, "clients": states})
        self.segments = [s for s in self.segments if s["file"] != name]
        self.segments.append({"file": name, "entries": len(states)})
        self._pending = {}
        return list(self.segments)

    def prune(self) -> None:
        """Remove the segment files the current list does not name (merged or never listed)."""
        keep = {s["file"] for s in self.segments}
        for path in self.out.glob(f"{SEGMENT_PREFIX}*.pt"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
