"""``fedq bench codec`` runs from the CLI, writes its JSON, and meets the deterministic wire targets
(timing targets depend on the machine and are reported, not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedq.cli import main


def test_bench_codec_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "codec.json"
    with pytest.raises(SystemExit) as done:
        main(["bench", "codec", "--size-mib", "1", "--repeats", "1", "--json", str(out)])
    assert done.value.code == 0
    result = json.loads(out.read_text())
    assert "memcpy (empty_like + copy_)" in capsys.readouterr().out
    assert result["config"]["shape"] == [64, 4096]
    assert result["memcpy_gbps"] > 0
    assert [r["bits"] for r in result["throughput"]] == ["1", "2", "3", "4", "8", "mixed 2..8"]
    assert all(r["quantize_gbps"] > 0 and r["dequantize_gbps"] > 0 for r in result["throughput"])
    assert 2 < result["throughput"][-1]["mean_bits"] < 8
    wire = {tuple(r["shape"]): r for r in result["wire"]}
    assert wire[(1000003,)]["granularity"] == "tensor"  # 1-D falls back to per-tensor
    assert wire[(64, 64)]["pass"] is None  # below 64K elements: reported, not gated
    for shape in [(4096, 1024), (512, 384), (1000003,)]:
        assert wire[shape]["pass"] is True
        assert wire[shape]["overhead"] <= 0.01
    assert wire[(4096, 1024)]["payload_bytes"] == 4096 * 1024 // 2
    assert result["compression"]["ratio"] >= 7.8
