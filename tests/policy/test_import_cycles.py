"""No import circles (docs/design.md, "Module map"): the module import graph of ``fedq`` and
``fedq_kernels``, read from the source, has no cycle.

A node is a module (a package is its ``__init__.py``). An edge is an import of another module of
the two packages, wherever it stands: at module top level, inside a function (a lazy import still
ties the two modules together, it only defers the tie to the call), or as
``importlib.import_module("literal")``. ``from pkg import name`` points at ``pkg.name`` where that
is a module, else at ``pkg``. Not edges: imports under ``if TYPE_CHECKING:`` (they never run),
and the implicit import of a module's parent packages (every submodule would otherwise form a
circle with its package's ``__init__``). The codec's dispatch to the kernels
(:data:`LAZY_EDGES`) is the one import from the codec into the kernels, inside a function so
that ``import fedq`` never loads triton; it counts like any edge, so the kernels must not import
the codec modules that dispatch (they import :mod:`fedq.codec.reference`, which does not)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Package name -> its directory.
ROOTS = {"fedq": REPO / "fedq", "fedq_kernels": REPO / "kernels" / "fedq_kernels"}
#: The declared lazy edges from the codec into the kernels (importer, imported).
LAZY_EDGES = {("fedq.codec.dispatch", "fedq_kernels")}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = [pkg, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _walk(node: ast.AST, lazy: bool = True) -> Iterator[ast.AST]:
    """``ast.walk`` that skips the bodies of ``if TYPE_CHECKING:``, and with ``lazy=False`` those
    of functions too (what runs when the module is imported)."""
    for child in ast.iter_child_nodes(node):
        if not lazy and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
            for other in child.orelse:
                yield other
                yield from _walk(other, lazy)
            continue
        yield child
        yield from _walk(child, lazy)


def _imports(name: str, path: Path, known: set[str], lazy: bool = True) -> set[str]:
    """The modules of ``known`` that module ``name`` (at ``path``) imports (with ``lazy=False``,
    when it is imported)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(target: str, member: str | None = None) -> None:
        if member and f"{target}.{member}" in known:
            found.add(f"{target}.{member}")
            return
        parts = target.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        if parts:
            found.add(".".join(parts))

    for node in _walk(ast.parse(path.read_text(), filename=str(path)), lazy):
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                up = here[: len(here) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                resolve(base, alias.name)
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            resolve(node.args[0].value)
    found.discard(name)
    return found


def import_graph(lazy: bool = True) -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known, lazy) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_graph_is_read_from_both_packages() -> None:
    graph = import_graph()
    assert "fedq.codec.quantize" in graph["fedq.codec"]
    assert "fedq.codec.reference" in graph["fedq_kernels.encode"]
    assert "fedq.runtime.sitedata" in graph["fedq.runtime.placement"]
    for importer, imported in LAZY_EDGES:
        assert imported in graph[importer], f"declared lazy edge {importer} -> {imported} is gone"


def test_the_codec_reaches_the_kernels_only_through_the_declared_lazy_edges() -> None:
    graph, eager = import_graph(), import_graph(lazy=False)
    found = {
        (a, b)
        for a, targets in graph.items()
        if a.startswith("fedq.codec")
        for b in targets
        if b.split(".")[0] == "fedq_kernels"
    }
    assert found == LAZY_EDGES
    for importer, imported in LAZY_EDGES:
        assert imported not in eager[importer], f"{importer} imports {imported} at top level"


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_checker_sees_lazy_relative_and_dynamic_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import a\n")
    f = pkg / "a.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import p.c\n"
        "def f():\n    from .b import x\n    import importlib\n"
        "    importlib.import_module('p.d.e')\n"
    )
    known = {"p", "p.a", "p.b", "p.c", "p.d"}
    assert _imports("p.a", f, known) == {"p.b", "p.d"}
    assert _imports("p.a", f, known, lazy=False) == set()
    assert _imports("p", pkg / "__init__.py", known) == {"p.a"}
