"""Imports flow one way (docs/design.md, "Module map"): codec -> adapt -> wire -> transport /
rounds -> fed / split -> modes -> runtime -> cli (``modes``, the registry of training modes,
sits above the modes' own packages; the runtime knows only the registry). privacy, data,
models and report know nothing of the wire or the transport; ``config`` and ``errors`` sit at
the bottom and import nothing above them. Function-level (lazy) imports count too, and
single-file modules are checked like packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FEDQ = Path(__file__).resolve().parents[2] / "fedq"

#: Every fedq module or package (the top-level names under fedq/).
ALL = {p.stem for p in FEDQ.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
ALL.discard("__init__")

#: module or package -> fedq modules / packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "errors": ALL - {"errors"},
    "config": ALL - {"config", "errors"},
    "codec": ALL - {"codec", "errors"},
    "adapt": {"wire", "transport", "fed", "split", "modes", "runtime", "cli", "bench", "privacy"},
    "wire": {"adapt", "transport", "fed", "split", "modes", "runtime", "cli", "bench", "privacy"},
    "transport": {
        "adapt",
        "fed",
        "split",
        "modes",
        "runtime",
        "cli",
        "bench",
        "privacy",
        "data",
        "models",
        "rounds",
    },
    # the round protocol knows nothing of gRPC (the transport calls it) nor of either mode
    "rounds": {
        "adapt",
        "transport",
        "fed",
        "split",
        "modes",
        "runtime",
        "cli",
        "bench",
        "privacy",
        "data",
        "models",
        "report",
    },
    "privacy": {"wire", "transport", "fed", "split", "modes", "runtime", "cli", "bench"},
    "data": {
        "wire",
        "transport",
        "fed",
        "split",
        "modes",
        "runtime",
        "cli",
        "bench",
        "privacy",
        "models",
    },
    "models": {"wire", "transport", "fed", "split", "modes", "runtime", "cli", "bench", "privacy"},
    "report": {"wire", "transport", "fed", "split", "modes", "runtime", "cli", "bench", "privacy"},
    "fed": {"split", "modes", "runtime", "cli", "bench"},
    "split": {"fed", "modes", "runtime", "cli", "bench"},
    # the mode registry: each mode builds on its own package, never on the runtime that runs it
    "modes": {"runtime", "cli", "bench"},
    "runtime": {"cli", "bench"},
    "bench": {"cli"},
}


def _imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for n in names:
            parts = n.split(".")
            if parts[0] == "fedq" and len(parts) > 1:
                out.add(parts[1])
    return out


def _files(name: str) -> list[Path]:
    single = FEDQ / f"{name}.py"
    if single.exists():
        return [single]
    return [p for p in sorted((FEDQ / name).rglob("*.py")) if "/pb/" not in str(p)]


def test_every_module_has_a_rule() -> None:
    """A new top-level module must be placed in the import order before it can land."""
    assert ALL - {"cli"} <= set(FORBIDDEN), sorted(ALL - {"cli"} - set(FORBIDDEN))


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_imports_flow_one_way(name: str) -> None:
    files = _files(name)
    assert files, f"no source for fedq.{name}"
    bad = [
        f"{path.relative_to(FEDQ.parent)} imports fedq.{target}"
        for path in files
        for target in sorted(_imported(path) & FORBIDDEN[name])
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from fedq.split.models import x\n    import fedq.runtime\n")
    assert _imported(f) == {"split", "runtime"}
