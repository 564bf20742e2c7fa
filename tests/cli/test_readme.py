"""The README's multi-machine recipe and its ``fedq serve --resume`` command, taken from the README
itself and run as written (in a scratch folder, on a free port, on loopback, with fewer rounds): if
the README's commands stop working, this fails. Its usage lines are checked against the CLI's
help. (The quickstart and the other commands are run by test_cli.py, test_deploy.py and
test_interrupt.py.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FEDQ = Path(sys.executable).with_name("fedq")
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
    "PATH": f"{FEDQ.parent}{os.pathsep}{os.environ.get('PATH', '')}",
}


def readme_commands(containing: str) -> list[list[str]]:
    """The commands of the README's first bash block that contains ``containing``: comment lines
    dropped, continuation lines joined, each split as the shell would."""
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    block = next(b for b in blocks if containing in b)
    lines = [x for x in block.replace("\\\n", " ").splitlines() if x.strip()]
    return [shlex.split(x, comments=True) for x in lines if not x.lstrip().startswith("#")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_recipe_is_what_the_readme_shows() -> None:
    cmds = readme_commands("# terminal 1: the server")
    assert [c[:2] for c in cmds] == [
        ["fedq", "certs"],
        ["fedq", "shard"],
        ["fedq", "serve"],
        ["fedq", "join"],
        ["fedq", "join"],
    ]


def test_the_resume_commands_are_what_the_readme_shows() -> None:
    cmds = readme_commands("# fedq serve: start a server that died again")
    assert [c[:3] for c in cmds] == [
        ["fedq", "simulate", "--resume"],
        ["fedq", "serve", "--resume"],
    ]
    assert len(cmds[0]) == 4  # ``fedq simulate --resume DIR``: run by test_interrupt.py


@pytest.mark.slow
@pytest.mark.skipif(not FEDQ.exists(), reason="the fedq entry point is not installed")
def test_the_readme_serve_and_join_recipe_runs_as_written(tmp_path: Path) -> None:
    """The recipe, with the server killed after its first round and started again with the
    README's ``fedq serve --resume`` command: the sites reconnect and the run completes."""
    (tmp_path / "scenarios").symlink_to(ROOT / "scenarios")
    port = str(_port())

    def local(arg: str) -> str:  # loopback only, a free port
        return arg.replace("0.0.0.0", "127.0.0.1").replace("50051", port)

    certs, shard, serve, *joins = [
        [local(a) for a in c] for c in readme_commands("# terminal 1: the server")
    ]
    resume = [local(a) for a in readme_commands("# fedq serve: start a server that died")[1]]
    for cmd in (certs, shard):
        done = subprocess.run(
            cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (cmd, done.stderr)
    rounds = 10
    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd in ([*serve, "--set", f"rounds.count={rounds}"], *joins)
    ]
    metrics = tmp_path / "runs" / "served" / "metrics.jsonl"
    try:
        end = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text()):
            assert time.monotonic() < end and procs[0].poll() is None, "no round was recorded"
            time.sleep(0.1)
        procs[0].kill()
        procs[0].wait(30)
        procs[0] = subprocess.Popen(
            resume,
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        outs = [procs[0].communicate(timeout=300)[0]]  # the server first: if it fails, say why
        assert procs[0].returncode == 0, outs[0]
        outs += [p.communicate(timeout=120)[0] for p in procs[1:]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    assert "resuming at round" in outs[0] and "done: accuracy" in outs[0]
    assert all("reconnecting" in o and f"done: completed {rounds} rounds" in o for o in outs[1:]), (
        outs
    )
    summary = json.loads((tmp_path / "runs" / "served" / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    assert set(summary["clients"]) == {"client-0", "client-1"}


def test_every_option_of_the_readme_usage_lines_is_one_the_cli_takes() -> None:
    """The README's "Using fedq" block: each command exists, every ``--option`` it shows is in
    that command's ``--help``, and the benches it lists are the benches there are."""
    from fedq.bench import BENCHES

    text = (ROOT / "README.md").read_text()
    block = text.split("## Using fedq", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [ln.split("  #", 1)[0] for ln in block.splitlines() if ln.startswith("fedq ")]
    assert {ln.split()[1] for ln in lines} >= {"simulate", "serve", "join", "bench"}
    for line in lines:
        words = line.split()
        if words[1] == "bench":
            assert set(words[2].split("|")) == set(BENCHES), words[2]
        shown = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
        cmd = [words[1], BENCHES[0]] if words[1] == "bench" else [words[1]]  # options per bench
        helped = subprocess.run(
            [str(FEDQ), *cmd, "--help"], capture_output=True, text=True, env=ENV, timeout=120
        )
        assert helped.returncode == 0, helped.stderr
        missing = {o for o in shown if o not in helped.stdout}
        assert not missing, f"{line!r}: fedq {words[1]} takes no {sorted(missing)}"
