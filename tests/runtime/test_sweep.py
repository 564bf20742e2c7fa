"""fedq sweep: the grid is validated up front, and a small sweep writes its table and plot."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedq.errors import ConfigError
from fedq.runtime.sweep import load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(f"scenario: {ROOT / 'scenarios' / 'quickstart.yaml'}\n" + body)
    return p


def test_every_problem_of_every_run_reported_before_any_run(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "bogus: 1\n"
        "grid:\n"
        "  compression.uplink.bits: [4, 0]\n"
        "  policy:\n"
        "    ok: {rounds.count: 2}\n"
        "    bad: {fed.roundz: 2}\n",
    )
    with pytest.raises(ConfigError) as ei:
        load_sweep(p)
    text = "\n".join(ei.value.problems)
    assert "bogus: unknown key" in text
    assert "run bits=0-ok: compression.uplink.bits" in text
    assert "run bits=4-bad: fed.roundz: unknown key" in text


def test_small_sweep_writes_table_and_plot(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "parallel: 1\n"
        "set: {rounds.count: 1, rounds.num_clients: 3, rounds.clients_per_round: 3,"
        " data.max_train: 200,"
        " model.hidden: 8}\n"
        "grid:\n"
        "  epsilon:\n"
        "    '4': {privacy.mechanism: central, privacy.noise_multiplier: 2.0}\n"
        "    inf: {privacy.mechanism: none}\n",
    )
    sweep = load_sweep(p)
    assert [r.label for r in sweep.runs] == ["4", "inf"]
    rows = run_sweep(sweep, tmp_path / "out")
    assert [r["label"] for r in rows] == ["4", "inf"]
    with (tmp_path / "out" / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["epsilon"] for t in table] == ["4", "inf"]
    assert float(table[0]["epsilon_spent"]) > 0 and table[1]["epsilon_spent"] == ""
    for r in rows:
        assert (Path(r["out_dir"]) / "metrics.jsonl").exists()
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| label | epsilon |" in (tmp_path / "out" / "sweep.md").read_text()


def test_broken_base_scenario_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("fed: [unclosed\n")
    p = tmp_path / "sweep.yaml"
    p.write_text("scenario: base.yaml\ngrid:\n  rounds.count: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"scenario: .*not valid YAML"):
        load_sweep(p)
    (tmp_path / "missing.yaml").write_text("scenario: nowhere.yaml\ngrid: {rounds.count: [1]}\n")
    with pytest.raises(ConfigError, match="scenario: scenario file not found"):
        load_sweep(tmp_path / "missing.yaml")
