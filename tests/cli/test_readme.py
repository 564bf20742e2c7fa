"""The README's multi-machine recipe, taken from the README itself and run as written (in a scratch
folder, on a free port, on loopback, with fewer rounds): if the README's commands stop working,
this fails. (The quickstart and the other commands are run by test_cli.py and test_deploy.py.)"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FEDQ = Path(sys.executable).with_name("fedq")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
       "PATH": f"{FEDQ.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip


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
    assert [c[:2] for c in cmds] == [["fedq", "certs"], ["fedq", "shard"], ["fedq", "serve"],
                                     ["fedq", "join"], ["fedq", "join"]]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not FEDQ.exists(), reason="the fedq entry point is not installed")
def test_the_readme_serve_and_join_recipe_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "scenarios").symlink_to(ROOT / "scenarios")
    port = str(_port())

    def local(arg: str) -> str:  # loopback only, a free port
        return arg.replace("0.0.0.0", "127.0.0.1").replace("50051", port)

    certs, shard, serve, *joins = [
        [local(a) for a in c] for c in readme_commands("# terminal 1: the server")
    ]
    for cmd in (certs, shard):
        done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, (cmd, done.stderr)
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for cmd in ([*serve, "--set", "fed.rounds=2"], *joins)]  # fmt: skip
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    assert "done: accuracy" in outs[0]
    assert all("done: completed 2 rounds" in o for o in outs[1:]), outs
    summary = json.loads((tmp_path / "runs" / "served" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and set(summary["clients"]) == {"client-0", "client-1"}
