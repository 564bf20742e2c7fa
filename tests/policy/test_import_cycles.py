"""No import circles (docs/design.md, "Module map"): the module import graph of ``fedq`` and
``fedq_kernels``, read from the source (:mod:`support.imports` says what counts as an edge), has
no cycle. The codec's dispatch to the kernels is the one import from the codec into the kernels,
inside a function so that ``import fedq`` never loads triton (the ``(lazy)`` rule of the design
document's ``imports`` block); it counts like any edge, so the kernels must not import the codec
modules that dispatch (they import :mod:`fedq.codec.reference`, which does not)."""

from __future__ import annotations

from pathlib import Path

from support.imports import find_cycle, import_graph, imports, read_rules

#: The declared lazy edges from the codec into the kernels (importer, imported), from
#: docs/design.md.
LAZY_EDGES = {
    (f"fedq.{key}", target)
    for key, may in read_rules().may.items()
    for target, lazy in may.items()
    if lazy and key.startswith("codec") and target.startswith("fedq_kernels")
}


def test_the_graph_is_read_from_both_packages() -> None:
    assert {("fedq.codec.dispatch", "fedq_kernels")} == LAZY_EDGES
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


def test_the_checker_sees_lazy_relative_and_dynamicimports(tmp_path: Path) -> None:
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
    assert imports("p.a", f, known) == {"p.b", "p.d"}
    assert imports("p.a", f, known, lazy=False) == set()
    assert imports("p", pkg / "__init__.py", known) == {"p.a"}
