"""Checkpoints are written atomically, a damaged one is a clear error (never a silent restart),
a privacy journal written when a later round opened is loaded over the checkpoint's ledger, and
client states are written as segments of what changed, merged when mostly superseded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedq.errors import ConfigError
from fedq.runtime.checkpoint import (
    CHECKPOINT_FILE,
    PRIVACY_FILE,
    SEGMENT_PREFIX,
    ClientStateLog,
    load_checkpoint,
    save_checkpoint,
    save_privacy_journal,
)


def _state(next_round: int = 3) -> dict:
    return {"next_round": next_round, "server": {"w": torch.arange(4.0)}, "clients": {}}


def test_round_trip_without_leftovers(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state())
    got = load_checkpoint(tmp_path)
    assert got["next_round"] == 3 and torch.equal(got["server"]["w"], torch.arange(4.0))
    assert got["ledger_journal"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # no temp file left


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    path = save_checkpoint(tmp_path, _state())
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00fedq" * 64, "empty": b""}[damage]
    )
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        load_checkpoint(tmp_path)


def test_missing_and_foreign_versions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no checkpoint\.pt"):
        load_checkpoint(tmp_path)
    torch.save({"version": 1, "next_round": 2}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ConfigError, match="unsupported checkpoint version 1"):
        load_checkpoint(tmp_path)


def test_the_journal_of_an_open_round_wins_over_the_checkpoint_ledger(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(next_round=3))
    save_privacy_journal(tmp_path, 2, {"spent": 1.0})  # older than the checkpoint: ignored
    assert load_checkpoint(tmp_path)["ledger_journal"] is None
    save_privacy_journal(tmp_path, 3, {"spent": 2.0})  # round 3 was charged, then the run died
    got = load_checkpoint(tmp_path)["ledger_journal"]
    assert got is not None and got["round"] == 3 and got["ledger"] == {"spent": 2.0}
    (tmp_path / PRIVACY_FILE).write_bytes(b"torn")
    with pytest.raises(ConfigError, match="privacy spent since the last round is unknown"):
        load_checkpoint(tmp_path)


def _segments(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{SEGMENT_PREFIX}*.pt"))


def _checkpoint_with(folder: Path, log: ClientStateLog, next_round: int, changed: dict) -> None:
    segments = log.append(next_round, changed)
    save_checkpoint(folder, {"next_round": next_round, "server": {}, "client_segments": segments})
    log.prune()


def test_a_round_writes_only_the_client_states_that_changed(tmp_path: Path) -> None:
    log = ClientStateLog(tmp_path)
    states = {f"c{i}": {"r": torch.full((3,), float(i))} for i in range(6)}
    _checkpoint_with(tmp_path, log, 1, {c: states[c] for c in ("c0", "c1", "c2")})
    _checkpoint_with(tmp_path, log, 2, {c: states[c] for c in ("c3", "c4")})
    assert _segments(tmp_path) == ["clients-1.pt", "clients-2.pt"]
    written = torch.load(tmp_path / "clients-2.pt", weights_only=True)["clients"]
    assert written.keys() == {"c3", "c4"}
    _checkpoint_with(tmp_path, log, 3, {})  # nothing changed: nothing written
    assert _segments(tmp_path) == ["clients-1.pt", "clients-2.pt"]
    newer = {"r": torch.full((3,), -1.0)}
    _checkpoint_with(tmp_path, log, 4, {"c1": newer})
    got = load_checkpoint(tmp_path)["clients"]
    assert got.keys() == {"c0", "c1", "c2", "c3", "c4"}
    assert torch.equal(got["c1"]["r"], newer["r"])
    assert torch.equal(got["c4"]["r"], states["c4"]["r"])


def test_superseded_segments_are_merged_and_removed(tmp_path: Path) -> None:
    log = ClientStateLog(tmp_path)
    for r in range(1, 4):  # the same two clients every round: 6 entries for 2 clients
        _checkpoint_with(tmp_path, log, r, {c: {"r": torch.tensor([float(r)])} for c in ("a", "b")})
    assert _segments(tmp_path) == ["clients-3.pt"] and log.entries == 2
    got = load_checkpoint(tmp_path)["clients"]
    assert got["a"]["r"].item() == 3.0 and got.keys() == {"a", "b"}
    # a resumed run continues the same log from what the checkpoint lists
    ckpt = load_checkpoint(tmp_path)
    resumed = ClientStateLog(tmp_path, ckpt["client_segments"], ckpt["clients"])
    _checkpoint_with(tmp_path, resumed, 4, {"c": {"r": torch.tensor([4.0])}})
    assert load_checkpoint(tmp_path)["clients"].keys() == {"a", "b", "c"}


def test_unlisted_segments_never_count_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    log = ClientStateLog(tmp_path)
    _checkpoint_with(tmp_path, log, 1, {"a": {"r": torch.zeros(1)}})
    log.append(2, {"a": {"r": torch.ones(1)}})  # the run died before checkpoint.pt listed it
    assert load_checkpoint(tmp_path)["clients"]["a"]["r"].item() == 0.0
    (tmp_path / "clients-1.pt").unlink()
    with pytest.raises(ConfigError, match=r"clients-1\.pt is missing"):
        load_checkpoint(tmp_path)


def test_a_version_2_checkpoint_with_inline_client_states_still_resumes(tmp_path: Path) -> None:
    inline = {"a": {"r": torch.zeros(2)}, "b": {"r": torch.ones(2)}}
    torch.save(
        {"version": 2, "next_round": 2, "server": {}, "clients": inline}, tmp_path / CHECKPOINT_FILE
    )
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["clients"].keys() == {"a", "b"}
    log = ClientStateLog(tmp_path, ckpt.get("client_segments", ()), ckpt["clients"])
    _checkpoint_with(tmp_path, log, 3, {"b": {"r": torch.full((2,), 5.0)}})
    got = load_checkpoint(tmp_path)["clients"]  # the inline states moved into the first segment
    assert torch.equal(got["a"]["r"], torch.zeros(2)) and got["b"]["r"][0].item() == 5.0
