"""What the production packages hold (docs/design.md, "Module map"): code that fedq itself runs.

- Every module of ``fedq`` and ``fedq_kernels`` is reached from the command line, the ``fedq``
  package or a benchmark: what only tests use (an in-process connection, network namespaces per
  client) lives in ``tests/support``.
- Network namespaces, veth pairs and ``tc`` belong to the benchmarks (``fedq/bench/netlink.py``);
  no other module names them (the ``subprocess <- bench`` rule of the design document keeps the
  processes there too).
- Nothing in fedq imports test code.
- Library code logs; only the CLI and the benchmarks' tables write to the console."""

from __future__ import annotations

import ast
from pathlib import Path

from support.imports import ROOTS, import_graph, imports, modules

from fedq.bench import BENCHES

FEDQ = ROOTS["fedq"]
#: protoc's gRPC stubs for tensor.proto, which declares no service: generated, never loaded.
GENERATED_UNUSED = {"fedq.wire.pb.tensor_pb2_grpc"}
#: Where the console may be written to.
CONSOLE = {FEDQ / "cli.py", FEDQ / "bench"}
#: Words only link emulation uses (iproute2's ``ip netns`` / ``ip link ... type veth``, ``tc``).
NETNS_WORDS = {"netns", "veth", "qdisc", "tbf"}


def reachable(graph: dict[str, set[str]], roots: list[str]) -> set[str]:
    """Modules reached from ``roots`` along ``graph``, a module's parent packages included."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += graph.get(name, ())
    return seen


def test_every_module_is_used_by_fedq_not_only_by_tests() -> None:
    graph = import_graph()
    roots = ["fedq", "fedq.cli", *(f"fedq.bench.{b}" for b in BENCHES)]
    unused = sorted(set(graph) - reachable(graph, roots) - GENERATED_UNUSED)
    assert not unused, (
        f"modules nothing in fedq uses (test code belongs in tests/support): {unused}"
    )


def test_the_reach_check_sees_a_module_only_tests_use() -> None:
    graph = {"fedq": set(), "fedq.cli": {"fedq.a.b"}, "fedq.a": set(), "fedq.a.b": set()}
    graph |= {"fedq.a.helper": {"fedq.a.b"}}
    assert set(graph) - reachable(graph, ["fedq.cli"]) == {"fedq.a.helper"}


def _strings(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_link_emulation_lives_in_the_benchmarks() -> None:
    found = [
        f"{path.relative_to(FEDQ.parent)}: {word!r}"
        for name, path in modules().items()
        if not name.startswith("fedq.bench")
        for word in sorted(_strings(path) & NETNS_WORDS)
    ]
    assert not found, found
    assert _strings(FEDQ / "bench" / "netlink.py") >= NETNS_WORDS  # the check looks for real words


def test_fedq_imports_no_test_code() -> None:
    mods = modules()
    found = [
        f"{name} imports {target}"
        for name, path in mods.items()
        for target in sorted(imports(name, path, set(mods), outside=True))
        if target in {"support", "tests", "conftest", "pytest"}
    ]
    assert not found, found


def _console_writes(path: Path) -> list[str]:
    """``print(...)``, ``sys.stdout`` / ``sys.stderr`` and tqdm in ``path``, with line numbers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "print":
                found.append(f"{node.lineno}: print")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "sys" and node.attr in {"stdout", "stderr", "__stdout__"}:
                found.append(f"{node.lineno}: sys.{node.attr}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] == "tqdm" for n in names):
                found.append(f"{node.lineno}: tqdm")
    return found


def test_only_the_cli_and_the_benchmarks_write_to_the_console() -> None:
    files = [
        p
        for p in sorted(FEDQ.rglob("*.py"))
        if "/pb/" not in str(p) and not any(p == c or c in p.parents for c in CONSOLE)
    ]
    assert len(files) >= 100, "policy scanned too few files"
    found = [f"{p.relative_to(FEDQ.parent)}:{w}" for p in files for w in _console_writes(p)]
    assert not found, f"library code logs through logging instead: {found}"
    assert _console_writes(FEDQ / "cli.py"), "the check finds nothing even in the CLI"


def test_the_console_check_sees_writes(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import sys\nfrom tqdm import tqdm\nprint(1)\nsys.stderr.write('x')\nlog = 1\n")
    assert _console_writes(f) == ["2: tqdm", "3: print", "4: sys.stderr"]
