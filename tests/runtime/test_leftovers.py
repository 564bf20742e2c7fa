"""A simulate driver killed with SIGKILL leaves Ray helpers behind for a while; the next start
ends exactly those (the ones using the dead driver's session folder) and removes the folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fedq.runtime.backend import RAY_TMP_PREFIX, _uses, clean_leftovers

ROOT = Path(__file__).resolve().parents[2]
FEDQ = Path(sys.executable).with_name("fedq")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FEDQ.exists(), reason="fedq entry point not installed"),
]


def test_the_next_start_ends_a_killed_drivers_leftovers(tmp_path: Path) -> None:
    # The driver keeps its Ray session folder in a temporary folder of this test's own: any
    # other Ray start on the machine (a parallel test worker's) ends the leftovers it finds in
    # the shared one, and would end these before this test's own clean-up could. Short, since
    # Ray's socket paths under it must stay within the OS limit.
    own = Path(tempfile.mkdtemp(prefix="fq"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TMPDIR": str(own),
    }
    out = tmp_path / "run"
    driver = subprocess.Popen(
        [
            str(FEDQ),
            "simulate",
            str(ROOT / "scenarios" / "quickstart.yaml"),
            "--set",
            "rounds.count=200",
            "--set",
            "runtime.object_store_mb=128",
            "--out",
            str(out),
            "-q",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert time.monotonic() < end and driver.poll() is None, "the run did not start"
            time.sleep(0.5)
        folders = list(own.glob(f"{RAY_TMP_PREFIX}{driver.pid}-*"))
        assert len(folders) == 1
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
        time.sleep(1)
        left = [p for p in psutil.process_iter() if _uses(p, str(folders[0]))]
        assert left, "expected Ray helpers to outlive a SIGKILLed driver for a while"
        ended = clean_leftovers(str(own))
        assert {p.pid for p in left} <= set(ended)
        assert not folders[0].exists()
        assert not [p for p in psutil.process_iter() if _uses(p, str(folders[0]))]
    finally:
        if driver.poll() is None:
            driver.kill()
        clean_leftovers(str(own))
        shutil.rmtree(own, ignore_errors=True)
