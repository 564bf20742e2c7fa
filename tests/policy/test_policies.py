"""Architecture policies: no object deserialization on the wire path; light, one-way imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WIRE_PATH_PACKAGES = [ROOT / "fedq" / "wire", ROOT / "fedq" / "transport"]
BANNED_MODULES = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
BANNED_CALLS = {("torch", "load"), ("numpy", "load"), ("np", "load")}
BANNED_BUILTINS = {"eval", "exec", "__import__"}


def _violations(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            names = []
        found += [f"imports {n}" for n in names if n in BANNED_MODULES]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in BANNED_CALLS:
                found.append(f"uses {node.value.id}.{node.attr}")
            if node.value.id in BANNED_MODULES:
                found.append(f"uses {node.value.id}.{node.attr}")
        if isinstance(node, ast.Name) and node.id in BANNED_BUILTINS:
            found.append(f"uses {node.id}")
    return [f"{path.relative_to(root)}:{v}" for v in found]


def test_no_object_deserialization_on_the_wire_path() -> None:
    files = [p for pkg in WIRE_PATH_PACKAGES for p in sorted(pkg.rglob("*.py"))]
    assert len(files) >= 8, "policy scanned too few files"
    problems = [v for f in files for v in _violations(f)]
    assert not problems, problems


def test_policy_checker_catches_violations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nx = torch.load('f')\ny = eval('1')\n")
    found = [v.split(":", 1)[1] for v in _violations(bad, tmp_path)]
    assert found == ["imports pickle", "uses torch.load", "uses eval"]


def _modules_after_import(*modules: str) -> set[str]:
    code = "import json, sys\n" + "".join(f"import {m}\n" for m in modules)
    code += "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return set(json.loads(out.stdout))


def _top(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


HEAVY = {"peft", "opacus", "transformers", "triton", "ray"}


def test_core_imports_stay_light_and_free_of_grpc() -> None:
    """``import fedq, fedq.codec, fedq.wire`` pulls in neither heavy stacks nor the transport."""
    loaded = _top(_modules_after_import("fedq", "fedq.codec", "fedq.wire"))
    assert {"fedq", "torch", "google"} <= loaded  # the probe really imported the packages
    assert not loaded & HEAVY, sorted(loaded & HEAVY)
    assert not loaded & {"grpc", "grpc_health"}, "fedq.codec / fedq.wire must not import grpc"


def test_transport_does_import_grpc() -> None:
    """Sanity check of the probe itself: it does see grpc when something imports it."""
    assert "grpc" in _top(_modules_after_import("fedq.transport"))


#: Documents that live outside the repository: nothing in it may point to them (the repository
#: stands alone; its own documents are in docs/). Spelled in pieces so this file is no exception.
OUTSIDE_DOCS = (
    "ALGORITHMS" + ".md",
    "ARCHITECTURE" + ".md",
    "ENV" + ".md",
    "STYLE" + ".md",
    "STYLE-ANCHORS" + ".md",
    "../" + "shared",
)


def test_nothing_in_the_repository_points_to_documents_outside_it() -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in {".png", ".npz", ".pt", ".bin", ".gguf"}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {doc}" for doc in OUTSIDE_DOCS if doc in text]
    assert not found, found


def test_the_formatter_owns_the_layout() -> None:
    """No hand-made layout against ruff format: no `fmt: skip` / `fmt: off` anywhere."""
    dirs = [ROOT / d for d in ("fedq", "tests", "kernels", "scripts")]
    files = [p for d in dirs for p in sorted(d.rglob("*.py")) if "/pb/" not in str(p)]
    assert len(files) >= 100, "policy scanned too few files"
    marker = "fmt" + ": "
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if f"# {marker}skip" in line or f"# {marker}off" in line
    ]
    assert not found, found
