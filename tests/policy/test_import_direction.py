"""Imports flow one way (ARCHITECTURE.md): codec -> adapt -> wire -> transport -> fed / split ->
runtime -> cli. privacy, data, models and report know nothing of the wire or the transport.
Function-level (lazy) imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FEDQ = Path(__file__).resolve().parents[2] / "fedq"

#: package -> fedq packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "codec": {
        "adapt",
        "wire",
        "transport",
        "fed",
        "split",
        "runtime",
        "cli",
        "bench",
        "privacy",
        "data",
        "models",
        "report",
    },
    "adapt": {"wire", "transport", "fed", "split", "runtime", "cli", "bench", "privacy"},
    "wire": {"adapt", "transport", "fed", "split", "runtime", "cli", "bench", "privacy"},
    "transport": {"adapt", "fed", "split", "runtime", "cli", "bench", "privacy", "data", "models"},
    "privacy": {"wire", "transport", "fed", "split", "runtime", "cli", "bench"},
    "data": {"wire", "transport", "fed", "split", "runtime", "cli", "bench", "privacy", "models"},
    "models": {"wire", "transport", "fed", "split", "runtime", "cli", "bench", "privacy"},
    "report": {"wire", "transport", "fed", "split", "runtime", "cli", "bench", "privacy"},
    "fed": {"split", "runtime", "cli", "bench"},
    "split": {"fed", "runtime", "cli", "bench"},
    "runtime": {"cli", "bench"},
}


def _imported_packages(path: Path) -> set[str]:
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


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    bad = []
    for path in sorted((FEDQ / package).rglob("*.py")):
        if "/pb/" in str(path):
            continue
        for target in _imported_packages(path) & FORBIDDEN[package]:
            bad.append(f"{path.relative_to(FEDQ.parent)} imports fedq.{target}")
    assert not bad, "\n".join(bad)
