"""The README's ``fedq`` commands, run as subprocesses of the installed CLI: what users type is
what is tested (the Python API tests cannot see argument parsing, file round trips such as a
run's config.json, or the console output)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

Run = Callable[..., Any]


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_help_lists_the_commands(fedq_cli: Run) -> None:
    done = fedq_cli("--help")
    assert done.returncode == 0
    for command in ("simulate", "sweep", "bench"):
        assert command in done.stdout


@pytest.mark.slow
def test_quickstart_on_ray_then_resume_from_its_folder(fedq_cli: Run, tmp_path: Path) -> None:
    """The README's main job (Ray, real gRPC), then ``--resume DIR --set rounds.count=N``: the
    saved config.json loads back (its 1e-05 delta included) and the run continues."""
    out = tmp_path / "q"
    first = fedq_cli(
        "simulate",
        "scenarios/quickstart.yaml",
        "--set",
        "rounds.count=2",
        "--set",
        "runtime.object_store_mb=128",
        "--out",
        str(out),
        "-q",
    )
    assert first.returncode == 0, first.stderr
    assert "done: accuracy" in first.stdout
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    assert [r["round"] for r in _records(out)] == [0, 1]
    again = fedq_cli("simulate", "--resume", str(out), "--set", "rounds.count=3", "-q")
    assert again.returncode == 0, again.stderr
    assert "resuming at round 2" in again.stdout
    assert [r["round"] for r in _records(out)] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["rounds"]["count"] == 3


@pytest.mark.parametrize(
    ("override", "first_line"),
    [
        ("rounds.num_clients=1000", "fedq: error: invalid configuration: dirichlet partition"),
        ("model.name=mpl", "fedq: error: invalid configuration: model.name: unknown 'mpl'"),
        ("fed.roundz=3", "fedq: error: invalid configuration: fed.roundz: unknown key"),
        ("fed.rounds=3", "fedq: error: invalid configuration: fed.rounds: moved to rounds.count"),
    ],
)
def test_configuration_problems_are_one_clear_error(
    fedq_cli: Run, tmp_path: Path, override: str, first_line: str
) -> None:
    """Bad keys and problems only the data or the registries reveal fail the same way: exit 2,
    a one-line error, no traceback, nothing started or written."""
    out = tmp_path / "never"
    done = fedq_cli(
        "simulate", "scenarios/quickstart.yaml", "--set", override, "--out", str(out), "-q"
    )
    assert done.returncode == 2
    assert done.stderr.startswith(first_line), done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_resume_without_a_checkpoint_is_a_clear_error(fedq_cli: Run, tmp_path: Path) -> None:
    done = fedq_cli("simulate", "--resume", str(tmp_path), "-q")
    assert done.returncode == 2
    assert "fedq: error:" in done.stderr and "Traceback" not in done.stderr


def test_sweep_runs_a_small_grid(fedq_cli: Run, tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        f"scenario: {ROOT / 'scenarios' / 'quickstart.yaml'}\n"
        "set: {rounds.count: 1, rounds.num_clients: 4, rounds.clients_per_round: 2}\n"
        "grid:\n  compression.uplink.bits: [2, 4]\n"
    )
    done = fedq_cli("sweep", str(sweep), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("  done ") == 2
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
