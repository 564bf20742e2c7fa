"""The CLI and the mode registry: a scenario naming a mode nobody registered is one line."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cli_refuses_an_unknown_mode_in_one_line(fedq_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    scenario = str(ROOT / "scenarios/quickstart.yaml")
    res = fedq_cli("simulate", scenario, "--set", "mode=splitfed", "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "fedq: error: invalid configuration: mode: must be one of 'federated' | 'split' "
        "(the registered modes), got 'splitfed'"
    ]
    assert not out.exists()
