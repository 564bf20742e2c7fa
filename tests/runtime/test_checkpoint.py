"""Checkpoints are written atomically, a damaged one is a clear error (never a silent restart),
and a privacy journal written when a later round opened is loaded over the checkpoint's ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedq.errors import ConfigError
from fedq.runtime.checkpoint import (
    CHECKPOINT_FILE,
    PRIVACY_FILE,
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
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00fedq" * 64,
                      "empty": b""}[damage])  # fmt: skip
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
