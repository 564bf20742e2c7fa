"""``fedq bench kernels``: without a CUDA device it times nothing, runs its interpreter smoke and
says so (through the real CLI, exit 0); its GPU code path runs end to end on the CPU with a
wall-clock timer (the numbers mean nothing there; the path, the checks and the report do)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="fedq_kernels need triton (pip install fedq[kernels])")

from fedq.bench import kernels as bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cli_without_a_gpu_says_so_and_runs_the_smoke(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the bench sets it
    done = subprocess.run(
        [sys.executable, "-m", "fedq.cli", "bench", "kernels", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "GPU numbers need a CUDA device" in done.stdout
    assert "4 cases, all bit-exact" in done.stdout
    result = json.loads(out.read_text())
    assert result["cuda"] is False and result["message"] == bench.NO_GPU
    assert result["smoke"]["all_exact"] is True and "rows" not in result


def _wall_ms(fn: Callable[[], object], rep_ms: int) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@pytest.mark.usefixtures("cpu_kernels")
def test_the_gpu_code_path_runs_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench.measure([1 / 64], 1, 0, device="cpu", timer=_wall_ms, amaq_shape=(2, 8, 384))
    rows = result["rows"]
    assert [r["bits"] for r in rows] == list(bench.BITS)
    assert all(r["exact"] for r in rows)
    assert all(r[f"{op}_kernel_gbps"] > 0 for r in rows for op in ("quantize", "dequantize"))
    assert rows[-1]["mean_bits"] > 2 and result["amaq"]["step_compute_ms"] > 0
    assert result["peak_gbps"] is None and result["targets"]["checks"] == []  # below 64 MiB
    bench._print_gpu({"machine": {}, **result})
    assert "AMAQ coding per split step" in capsys.readouterr().out
    json.dumps(result)


def test_peak_table_and_targets() -> None:
    assert bench.peak_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert bench.peak_gbps("NVIDIA H100 PCIe") == 2000.0
    assert bench.peak_gbps("NVIDIA H200") == 4800.0
    assert bench.peak_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
    assert bench.peak_gbps("Some GPU") is None
    assert bench.target_for("4") == 0.85 and bench.target_for("3") == 0.60
    assert bench.target_for("mixed") == 0.60


def test_verdicts_gate_at_64_mib_and_compare_with_torch() -> None:
    def row(size: float, bits: str, share: float, speedup: float) -> dict[str, object]:
        return {
            "size_mib": size,
            "bits": bits,
            "quantize_of_peak": share,
            "dequantize_of_peak": share,
            "quantize_speedup": speedup,
            "dequantize_speedup": speedup,
        }

    rows = [row(16, "4", 0.1, 2.0), row(64, "4", 0.8, 2.0), row(64, "3", 0.61, 1.5)]
    t = bench._verdicts(rows, 3350.0)
    assert len(t["checks"]) == 4  # the 16 MiB row is not gated
    four = [c for c in t["checks"] if c["bits"] == "4"]
    assert all(not c["pass"] and c["first_bar_pass"] for c in four)  # 80%: first bar only
    assert all(c["pass"] for c in t["checks"] if c["bits"] == "3")
    assert t["never_slower"] and not t["all_pass"]
    assert not bench._verdicts([row(64, "8", 0.9, 0.9)], 3350.0)["never_slower"]
