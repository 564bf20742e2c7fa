"""End to end through real Ray and real gRPC: the CLI's simulate on a tiny scenario."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedq.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_simulate_on_ray_writes_contract_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as ei:
        main(
            [
                "simulate",
                str(ROOT / "scenarios" / "quickstart.yaml"),
                "--out",
                str(out),
                "-q",
                "--set",
                "rounds.num_clients=3",
                "--set",
                "rounds.clients_per_round=3",
                "--set",
                "rounds.count=2",
                "--set",
                "model.hidden=16",
                "--set",
                "runtime.workers=2",
                "--set",
                "data.max_train=300",
            ]
        )
    assert ei.value.code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["rounds"]["count"] == 2 and config["runtime"]["backend"] == "ray"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        for key in ("accuracy", "loss", "bytes_up", "bytes_down", "bytes_fp32", "mean_bits"):
            assert r[key] is not None, key
        assert "epsilon" in r
        assert r["clients_ok"] == r["clients_selected"] == 3 and r["applied"]
        assert r["clients_dropped"] == 0 and r["dropped"] == {}
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["mean_bits"] == 4.0
        assert r["bytes_up"] < r["bytes_fp32"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["bytes_wire_total"] == sum(r["bytes_up"] + r["bytes_down"] for r in records)
    # bytes counted by the server's transport (per round) == bytes counted by the clients' own
    # transports in the worker actors (their totals, taken when the workers stop)
    assert summary["client_bytes_up"] == summary["bytes_up_total"] > 0
    assert summary["client_bytes_down"] == summary["bytes_down_total"] > 0
    assert summary["stopped_reason"] is None and summary["interrupted"] is False
    assert summary["final_accuracy"] == records[-1]["accuracy"]
    assert summary["compression_ratio"] > 1.0
    assert (out / "checkpoint.pt").stat().st_size > 0  # written after every round
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_scenario_fails_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("fed:\n  roundz: 3\ncompression:\n  uplink:\n    bits: 0\n")
    with pytest.raises(SystemExit) as ei:
        main(["simulate", str(bad), "--out", str(tmp_path / "o")])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "fed.roundz: unknown key" in err and "compression.uplink.bits" in err
    assert not (tmp_path / "o").exists()
