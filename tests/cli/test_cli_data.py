"""Bad data and bad scenarios from the CLI: one ``fedq: error: ...`` line naming the file and the
problem, exit status 2, no traceback, before anything starts (``simulate``, ``shard``, ``serve
--eval-data``, ``join --data``); and the warnings about unscaled features and a collapsed model,
with ``data.standardize`` as their fix."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

Run = Callable[..., Any]
ERR = "fedq: error: invalid configuration: "
TOKEN = "t" * 40


def _scenario(tmp_path: Path, data: str, **extra: Any) -> Path:
    raw = {
        "name": "data",
        "data": {"name": data, "partition": "iid", **extra},
        "rounds": {"count": 3, "num_clients": 2, "clients_per_round": 2},
        "train": {"batch_size": 16, "lr": 0.1},
        "runtime": {"backend": "inprocess"},
    }
    path = tmp_path / "scenario.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def _npz(path: Path, x: Any, y: Any) -> Path:
    np.savez(path, x=np.asarray(x), y=np.asarray(y))
    return path


def _bad_files(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (data source, the problem as the error line says it, after the file's path)."""
    x = np.random.default_rng(0).normal(size=(40, 3))
    y = np.arange(40) % 2
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\nnice,1\ncaf\xe9 au lait,0\n".encode("latin-1"))
    zipish = tmp_path / "zipish.npz"
    zipish.write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    text = tmp_path / "text.npz"
    text.write_text("x,y\n1,2\n")
    nan = x.copy()
    nan[7, 1], nan[9, 0] = np.nan, np.inf
    frac = y.astype(float)
    frac[3] = 0.5
    neg = y.copy()
    neg[5] = -1
    how = "write one with numpy.savez(path, x=features, y=labels)"
    return {
        "latin1": (
            f"csv:{latin}",
            "not UTF-8 text: byte 0xe9 at offset 21 (line 3); save the file as UTF-8",
        ),
        "zip": (f"npz:{zipish}", f"not an npz file (File is not a zip file); {how}"),
        "text": (f"npz:{text}", f"not an npz file (no zip signature at its start); {how}"),
        "nan": (
            f"npz:{_npz(tmp_path / 'nan.npz', nan, y)}",
            "x: 2 rows with NaN or Inf features (first: row 7); drop or impute them",
        ),
        "fraction": (
            f"npz:{_npz(tmp_path / 'frac.npz', x, frac)}",
            "labels must be class indices (whole numbers), got 0.5 at row 3 (1 row in all)",
        ),
        "negative": (
            f"npz:{_npz(tmp_path / 'neg.npz', x, neg)}",
            "labels must be class indices >= 0, got -1 at row 5",
        ),
        "strings": (
            f"npz:{_npz(tmp_path / 'strx.npz', x.astype(str), y)}",
            "x: features must be numeric, got dtype <U32",
        ),
        "arrays": (f"npz:{tmp_path / 'noy.npz'}", "missing arrays ['y'] (found ['x'])"),
    }


def _one_error(done: Any, line: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == line + "\n", done.stderr
    assert "Traceback" not in done.stdout + done.stderr


CASES = ["latin1", "zip", "text", "nan", "fraction", "negative", "strings", "arrays"]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_error_line_before_anything_starts(
    fedq_cli: Run, tmp_path: Path, case: str
) -> None:
    np.savez(tmp_path / "noy.npz", x=np.zeros((4, 2)))
    source, problem = _bad_files(tmp_path)[case]
    out = tmp_path / "never"
    done = fedq_cli("simulate", str(_scenario(tmp_path, source)), "--out", str(out), "-q")
    _one_error(done, f"{ERR}data.name: {source.partition(':')[2]}: {problem}")
    assert not out.exists()


def test_bad_data_fails_the_same_way_in_shard_serve_and_join(fedq_cli: Run, tmp_path: Path) -> None:
    source, problem = _bad_files(tmp_path)["nan"]
    path = source.partition(":")[2]
    scenario = str(_scenario(tmp_path, source))
    shard = fedq_cli("shard", scenario, "--out", str(tmp_path / "shards"))
    _one_error(shard, f"{ERR}{path}: {problem}")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"client-0: {TOKEN}\nclient-1: {TOKEN[::-1]}u\n")
    tokens.chmod(0o600)
    serve = fedq_cli(
        "serve",
        str(_scenario(tmp_path, "digits")),
        "--listen",
        "127.0.0.1:0",
        "--tokens",
        str(tokens),
        "--eval-data",
        source,
        "--out",
        str(tmp_path / "run"),
    )
    assert serve.returncode == 2 and f"fedq: error: {ERR[13:]}{path}: {problem}\n" in serve.stderr
    assert "Traceback" not in serve.stderr
    token = tmp_path / "client-0.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    join = fedq_cli(
        "join",
        "--server",
        "127.0.0.1:9",
        "--client-id",
        "client-0",
        "--token-file",
        str(token),
        "--data",
        source,
    )
    _one_error(join, f"{ERR}{path}: {problem}")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("", "the scenario file is empty"),
        ("# only a comment\n", "the scenario file is empty"),
        ("- a list\n", "a scenario must be a mapping, got list"),
    ],
)
def test_an_empty_scenario_is_an_error(fedq_cli: Run, tmp_path: Path, text: str, line: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    done = fedq_cli("simulate", str(path), "--out", str(tmp_path / "never"), "-q")
    _one_error(done, f"{ERR}{path}: {line}")


def test_one_class_of_labels_is_an_error(fedq_cli: Run, tmp_path: Path) -> None:
    csv = tmp_path / "one.csv"
    csv.write_text("text,label\n" + "".join(f"row {i},spam\n" for i in range(20)))
    scenario = str(_scenario(tmp_path, f"csv:{csv}"))
    done = fedq_cli(
        "simulate",
        scenario,
        "-q",
        "--set",
        "model.name=minilm_lora",
        "--out",
        str(tmp_path / "never"),
    )
    _one_error(
        done,
        f"{ERR}data.name: every training label of 'csv:{csv}' is class 0; a "
        "classifier needs two or more classes",
    )


def test_unscaled_features_warn_and_standardize_fixes_them(fedq_cli: Run, tmp_path: Path) -> None:
    """scikit-learn's breast-cancer data as it comes (columns up to the thousands): plain SGD
    predicts the majority class (63%) and both warnings say so, once each; with
    ``data.standardize: true`` the same run learns."""
    from sklearn.datasets import load_breast_cancer

    bc = load_breast_cancer()
    source = f"npz:{_npz(tmp_path / 'bc.npz', bc.data, bc.target)}"
    majority = float(np.bincount(bc.target).max() / len(bc.target))
    accuracy = {}
    for standardize in (False, True):
        out = tmp_path / f"run-{standardize}"
        scenario = _scenario(tmp_path, source, standardize=standardize)
        done = fedq_cli("simulate", str(scenario), "--out", str(out), "-q")
        assert done.returncode == 0, done.stderr
        warnings = [ln for ln in done.stderr.splitlines() if ln.startswith("fedq: warning: ")]
        accuracy[standardize] = json.loads((out / "summary.json").read_text())["final_accuracy"]
        if standardize:
            assert warnings == [], done.stderr
        else:
            assert len(warnings) == 2, done.stderr
            assert warnings[0].startswith(
                f"fedq: warning: data.name {source!r}: features are far "
                "from unit scale (column 23: mean 886.9"
            )
            assert warnings[0].endswith("set data.standardize: true")
            assert warnings[1].startswith(
                "fedq: warning: round 0: the model predicts class 1 for all 113 evaluation rows"
            )
    assert accuracy[False] == pytest.approx(majority, abs=0.01)
    assert accuracy[True] > 0.9


def test_git_ignores_what_the_readme_recipe_writes() -> None:
    """The serve / join recipe writes private keys, tokens and data into the working tree."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    text = (root / "README.md").read_text()
    block = next(b for b in text.split("```bash\n")[1:] if "# terminal 1: the server" in b)
    assert "fedq certs certs " in block and "--out data\n" in block and "--out runs/served" in block
    written = [
        "certs/ca.key",
        "certs/tokens.yaml",
        "certs/clients/client-0.token",
        "data/client-0.npz",
        "runs/served/checkpoint.pt",
    ]
    done = subprocess.run(
        ["git", "check-ignore", *written], cwd=root, capture_output=True, text=True
    )
    assert done.stdout.split() == written, done.stdout + done.stderr
    tracked = subprocess.run(
        ["git", "ls-files", "certs", "data"], cwd=root, capture_output=True, text=True
    )
    assert tracked.stdout == ""  # nothing of the repository's own is hidden


def test_a_joining_site_warns_about_its_unscaled_data_and_the_server_about_the_collapse(
    fedq_cli: Run, tmp_path: Path
) -> None:
    """``fedq join`` checks its own data's scale once the run's configuration arrives (the
    server's scenario decides ``data.standardize``); ``fedq serve`` warns once of a collapse."""
    import subprocess
    import sys

    from sklearn.datasets import load_breast_cancer

    bc = load_breast_cancer()
    site = f"npz:{_npz(tmp_path / 'site.npz', bc.data[::2], bc.target[::2])}"
    evals = f"npz:{_npz(tmp_path / 'eval.npz', bc.data[1::2], bc.target[1::2])}"
    scenario = _scenario(tmp_path, "digits")
    tokens, token = tmp_path / "tokens.yaml", tmp_path / "client-0.token"
    tokens.write_text(f"client-0: {TOKEN}\n")
    token.write_text(TOKEN)
    for f in (tokens, token):
        f.chmod(0o600)
    fedq = str(Path(sys.executable).with_name("fedq"))
    server = subprocess.Popen(
        [
            fedq,
            "serve",
            str(scenario),
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            str(tokens),
            "--eval-data",
            evals,
            "--out",
            str(tmp_path / "run"),
            "--set",
            "rounds.num_clients=1",
            "--set",
            "rounds.clients_per_round=1",
            "--set",
            "rounds.count=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        lines = []
        for line in server.stdout:
            lines.append(line)
            if line.startswith("listening on "):
                break
        address = lines[-1].split()[2]
        join = fedq_cli(
            "join",
            "--server",
            address,
            "--client-id",
            "client-0",
            "--token-file",
            str(token),
            "--data",
            site,
            timeout=120,
        )
        out, _ = server.communicate(timeout=120)
    finally:
        server.kill()
    assert join.returncode == 0, join.stdout + join.stderr
    warned = [ln for ln in join.stderr.splitlines() if ln.startswith("fedq: warning: ")]
    assert len(warned) == 1 and warned[0].startswith(
        f"fedq: warning: --data {site}: features are far from unit scale (column 23:"
    ), join.stderr
    collapsed = [ln for ln in out.splitlines() if "training collapsed to one class" in ln]
    assert len(collapsed) == 1 and collapsed[0].startswith(
        "fedq: warning: round 0: the model predicts class 1 for all 57 evaluation rows"
    ), out
