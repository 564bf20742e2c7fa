"""Run the real ``fedq`` command as a user does: a subprocess of the installed entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The console script pip installed next to this interpreter (``.venv/bin/fedq``).
FEDQ = Path(sys.executable).with_name("fedq")


def run_fedq(*args: str, timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.run(
        [str(FEDQ), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def fedq_cli() -> object:
    if not FEDQ.exists():
        pytest.skip(f"the fedq entry point is not installed next to {sys.executable}")
    return run_fedq
