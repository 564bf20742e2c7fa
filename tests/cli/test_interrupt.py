"""``fedq simulate`` stopped from outside, as a shell or the system stops it, then resumed with
``fedq simulate --resume DIR``: SIGINT (Ctrl-C) while a round is open, then SIGKILL of the
resumed run, then a second resume to the end. The rounds (losses, accuracy, bytes, bits) and the
summary equal those of an uninterrupted run of the same scenario, in federated and split mode.
A SIGKILLed Ray run leaves helper processes behind; the next run ends them (that run's only).

Federated client state is kept per client, so the chain may change backends between resumes:
in-process where Ray adds nothing to what is tested, Ray for the SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedq.runtime.backend import RAY_TMP_PREFIX, _uses
from fedq.runtime.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FEDQ = Path(sys.executable).with_name("fedq")
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FEDQ.exists(), reason="fedq entry point not installed"),
]

INPROCESS = ["--set", "runtime.backend=inprocess"]
RAY = ["--set", "runtime.backend=ray", "--set", "runtime.object_store_mb=128"]
#: Rounds of about a second each on a shared 2-core machine: a signal sent when a round opens
#: lands while it is open.
FEDERATED = ("quickstart.yaml", ["--set", "rounds.count=5", "--set", "train.local_epochs=100"])
SPLIT = ("split_tiny.yaml", ["--set", "rounds.count=4", "--set", "split.local_steps=16"])
#: What must match per round (all but timings); absent keys compare as None.
SAME = (
    "round",
    "clients_selected",
    "clients_ok",
    "updated",
    "applied",
    "loss",
    "train_loss",
    "accuracy",
    "bytes_up",
    "bytes_down",
    "cum_bytes",
    "bytes_fp32",
    "mean_bits",
    "bits/cut/act/mean",
    "bits/cut/grad/mean",
)


def _as_from_a_terminal() -> None:
    """Ctrl-C reaches the run as it does from a terminal, however the tests were started: a shell
    that runs a command in the background without job control starts it with SIGINT ignored,
    and a child inherits that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """A ``fedq`` process whose output is collected as it comes, so a test can act on a line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(FEDQ), *args],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_as_from_a_terminal,
        )
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()

    def wait_line(self, pattern: str, timeout: float) -> str:
        """The first output line matching ``pattern`` (waiting for it)."""
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                hit = next((x for x in self.lines if re.search(pattern, x)), None)
                if hit is not None:
                    return hit
                left = end - time.monotonic()
                assert left > 0 and self.proc.poll() is None, (pattern, self.output())
                self._cv.wait(min(left, 0.5))

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(10)
        return rc, self.output()

    def output(self) -> str:
        return "".join(self.lines)


def _simulate(scenario: tuple[str, list[str]], out: Path, *extra: str) -> list[str]:
    name, over = scenario
    return ["simulate", str(ROOT / "scenarios" / name), *over, "--out", str(out), *extra]


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(x) for x in lines[:-1] + [x for x in lines[-1:] if x.endswith("}")]]


def _steps(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "bits.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _interrupt_mid_round(scenario: tuple[str, list[str]], out: Path, r: int) -> None:
    """Start a run, send SIGINT as round ``r`` opens: it stops with the rounds before ``r``
    recorded and checkpointed, and exit status 130."""
    run = Run("-v", *_simulate(scenario, out, *INPROCESS, "-q"))
    run.wait_line(rf"fedq\.rounds\.engine: round {r}: client-", 300)
    run.proc.send_signal(signal.SIGINT)
    rc, log = run.finish(120)
    assert rc == 130, log
    assert [x["round"] for x in _records(out)] == list(range(r)), log  # round r was open
    assert int(load_checkpoint(out)["next_round"]) == r
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["rounds_completed"] == r


def _kill_when(run: Run, out: Path, rounds: int, timeout: float) -> int:
    """SIGKILL ``run`` once ``out`` holds ``rounds`` round records; returns the round the next
    resume starts at (the checkpoint's)."""
    end = time.monotonic() + timeout
    while len(_records(out)) < rounds:
        assert time.monotonic() < end and run.proc.poll() is None, run.output()
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGKILL)
    rc, log = run.finish(60)
    assert rc == -signal.SIGKILL, log
    start = int(load_checkpoint(out)["next_round"])
    assert rounds - 1 <= start <= rounds  # the record is written just before the checkpoint
    return start


def _resume_to_the_end(out: Path, start: int, *extra: str) -> dict[str, Any]:
    rc, log = Run("simulate", "--resume", str(out), *extra).finish(600)
    assert rc == 0, log
    assert f"resuming at round {start};" in log
    return dict(json.loads((out / "summary.json").read_text()))


def _assert_same_run(full: Path, part: Path) -> None:
    a, b = _records(full), _records(part)
    assert [r["round"] for r in b] == list(range(len(a)))
    for key in SAME:
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    for key in (
        "rounds_completed",
        "final_accuracy",
        "bytes_wire_total",
        "bytes_up_total",
        "bytes_down_total",
        "compression_ratio",
        "client_bytes_up",
        "client_bytes_down",
    ):
        assert sa.get(key) == sb.get(key), key
    assert sb["interrupted"] is False


def _ray_folder(pid: int, timeout: float) -> Path:
    """The embedded Ray session folder of the driver ``pid`` (it appears as Ray starts)."""
    end = time.monotonic() + timeout
    while True:
        found = list(Path(tempfile.gettempdir()).glob(f"{RAY_TMP_PREFIX}{pid}-*"))
        if found:
            assert len(found) == 1, found
            return found[0]
        assert time.monotonic() < end, f"no Ray session folder for driver {pid}"
        time.sleep(0.2)


def test_federated_sigint_mid_round_then_sigkill_on_ray_resume_to_the_same_result(
    tmp_path: Path,
) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    rc, log = Run(*_simulate(FEDERATED, full, *INPROCESS, "-q")).finish(600)
    assert rc == 0, log

    _interrupt_mid_round(FEDERATED, part, 2)
    run = Run("simulate", "--resume", str(part), *RAY, "-q")  # its config.json, on Ray now
    folder = _ray_folder(run.proc.pid, 300)
    start = _kill_when(run, part, 4, 600)
    assert "resuming at round 2;" in run.output()
    summary = _resume_to_the_end(part, start, *RAY)
    _assert_same_run(full, part)
    assert summary["client_bytes_up"] == summary["bytes_up_total"] > 0
    # the killed driver's Ray helpers were ended by the next start, its folder removed
    assert not folder.exists()
    assert not [p.pid for p in psutil.process_iter() if _uses(p, str(folder))]


def test_split_sigint_mid_round_then_sigkill_resume_to_the_same_result(tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    rc, log = Run(*_simulate(SPLIT, full, "-q")).finish(600)
    assert rc == 0, log

    _interrupt_mid_round(SPLIT, part, 1)
    start = _kill_when(Run("simulate", "--resume", str(part), "-q"), part, 3, 600)
    _resume_to_the_end(part, start)
    _assert_same_run(full, part)
    assert _steps(full) == _steps(part)  # every step: loss, bytes, bits
    maps = [json.loads((d / "bit_maps.json").read_text()) for d in (full, part)]
    assert maps[0] == maps[1]
