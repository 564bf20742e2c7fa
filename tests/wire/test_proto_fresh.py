"""The committed generated protobuf code must match what scripts/gen_proto.sh produces now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PB = ROOT / "fedq" / "wire" / "pb"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    fresh = tmp_path / "fedq" / "wire" / "pb"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert "tensor_pb2.py" in names and "service_pb2_grpc.py" in names
    committed = sorted(p.name for p in PB.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"})
    assert committed == names, "generated file set differs; run scripts/gen_proto.sh"
    stale = [n for n in names if (fresh / n).read_bytes() != (PB / n).read_bytes()]
    assert not stale, f"stale generated code {stale}; run scripts/gen_proto.sh and commit"
