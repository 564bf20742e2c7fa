"""``fedq`` CLI processes as the benches that time whole deployments drive them (``fedq bench
faults``, ``fedq bench transport --part rounds``): the installed command, an environment with one
torch thread per process (several processes share the machine), one-shot commands, and a running
process whose output lines are kept with their arrival times so a bench can wait for a line and
act on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedq.errors import FedqError


def fedq_command() -> list[str]:
    """The ``fedq`` console script next to this interpreter (the installed CLI), else the
    module."""
    script = Path(sys.executable).with_name("fedq")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedq.cli"]


def cli_env() -> dict[str, str]:
    """This environment with unbuffered output and one torch (OpenMP / MKL) thread per process,
    so that N processes on a few cores do not oversubscribe them."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cli(args: list[str], cwd: Path, timeout: float) -> None:
    """Run one ``fedq`` command to its end (set-up such as ``fedq certs``); FedqError if it
    fails."""
    done = subprocess.run(
        [*fedq_command(), *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise FedqError(f"fedq bench: fedq {args[0]} failed: {done.stderr.strip()}")


class CliProcess:
    """A running ``fedq`` process whose output lines are read as they come, each with its
    arrival time (``time.monotonic()``); a wait for a line gives up after ``timeout`` seconds
    unless told otherwise."""

    def __init__(self, name: str, args: list[str], cwd: Path, timeout: float = 300.0) -> None:
        self.name = name
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [*fedq_command(), *args],
            cwd=cwd,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"bench-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def seen(self, pattern: str) -> bool:
        return self.count(pattern) > 0

    def count(self, pattern: str) -> int:
        """How many of the lines so far match ``pattern``."""
        with self._cv:
            return sum(bool(re.search(pattern, line)) for _, line in self.lines)

    def wait_line(
        self, pattern: str, timeout: float | None = None, after: float = 0.0
    ) -> tuple[float, str]:
        """The first output line matching ``pattern`` that arrived after ``after``, and when it
        arrived, waiting for it; FedqError if the process ends or ``timeout`` passes first."""
        timeout = self.timeout if timeout is None else timeout
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                hit = next(
                    ((t, line) for t, line in self.lines if t > after and re.search(pattern, line)),
                    None,
                )
                if hit is not None:
                    return hit
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise FedqError(
                        f"fedq bench: {self.name} printed no line matching "
                        f"{pattern!r} within {timeout:g} s; its output ends:\n"
                        f"{self.tail()}"
                    )
                self._cv.wait(min(left, 0.5))

    def wait_for(self, pattern: str, timeout: float | None = None, after: float = 0.0) -> float:
        """When the first line matching ``pattern`` (after ``after``) arrived (waiting for it)."""
        return self.wait_line(pattern, timeout, after)[0]

    def signal(self, sig: int) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def end(self, timeout: float = 60.0) -> int | None:
        """Wait for the process to exit (killed after ``timeout``); its exit status."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode

    def failed(self) -> FedqError:
        """The error for a process that exited with a failure status."""
        return FedqError(
            f"fedq bench: {self.name} exited with status {self.proc.returncode}; "
            f"its output ends:\n{self.tail()}"
        )

    def tail(self, lines: int = 15) -> str:
        with self._cv:
            return "\n".join(line for _, line in self.lines[-lines:])

    def log(self) -> str:
        with self._cv:
            return "\n".join(line for _, line in self.lines) + "\n"

    def write_log(self, folder: Path) -> None:
        """Its output so far as ``folder/<name>.log`` (spaces in the name become dashes)."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.name.replace(' ', '-')}.log").write_text(self.log())
