"""The import graph of ``fedq`` and ``fedq_kernels`` read from the source, and the import rules
``docs/design.md`` states (its ``imports`` block), for the policy tests in ``tests/policy``.

A node is a module (a package is its ``__init__.py``). An edge is an import of another module of
the two packages, wherever it stands: at module top level, inside a function (a lazy import still
ties the two modules together, it only defers the tie to the call), or as
``importlib.import_module("literal")``. ``from pkg import name`` points at ``pkg.name`` where that
is a module, else at ``pkg``. Not edges: imports under ``if TYPE_CHECKING:`` (they never run),
and the implicit import of a module's parent packages (every submodule would otherwise form a
circle with its package's ``__init__``). Imports of anything else are kept by their top-level
name (``grpc``, ``ray``)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Package name -> its directory.
ROOTS = {"fedq": REPO / "fedq", "fedq_kernels": REPO / "kernels" / "fedq_kernels"}
DESIGN = REPO / "docs" / "design.md"


def modules(roots: dict[str, Path] = ROOTS) -> dict[str, Path]:
    """Every module of ``roots`` (dotted name -> file)."""
    out = {}
    for pkg, root in roots.items():
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


def imports(
    name: str, path: Path, known: set[str], lazy: bool = True, outside: bool = False
) -> set[str]:
    """The modules of ``known`` that module ``name`` (at ``path``) imports (with ``lazy=False``,
    when it is imported); with ``outside=True`` also the top-level names of the other packages it
    imports."""
    is_pkg = path.name == "__init__.py"
    ours = {k.split(".")[0] for k in known}
    found: set[str] = set()

    def resolve(target: str, member: str | None = None) -> None:
        if member and f"{target}.{member}" in known:
            found.add(f"{target}.{member}")
            return
        parts = target.split(".")
        if parts[0] not in ours:
            if outside and parts[0]:
                found.add(parts[0])
            return
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


def import_graph(lazy: bool = True, outside: bool = False) -> dict[str, set[str]]:
    """Module -> what it imports (:func:`imports`) for every module of ``fedq`` and
    ``fedq_kernels``."""
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known, lazy, outside) for name, path in mods.items()}


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


# ---------------------------------------------------------------- the rules of docs/design.md


def short(module: str) -> str:
    """A module's name in the rules: ``fedq.codec.layout`` -> ``codec.layout``; ``fedq`` itself
    -> ``""``; ``fedq_kernels...`` unchanged."""
    if module == "fedq":
        return ""
    return module.removeprefix("fedq.")


def covers(entry: str, name: str) -> bool:
    """``entry`` names ``name`` or a package above it (``codec`` covers ``codec.layout``)."""
    return name == entry or name.startswith(entry + ".")


@dataclass
class Rules:
    """``may[key]``: what the modules under ``key`` may import (entry -> only lazily); a module
    follows its most specific key. ``only[name]``: the only modules that may import the package
    ``name`` (importer -> only lazily)."""

    may: dict[str, dict[str, bool]] = field(default_factory=dict)
    only: dict[str, dict[str, bool]] = field(default_factory=dict)

    def key_of(self, name: str) -> str | None:
        """The most specific rule key covering ``name`` (a short name), or None."""
        keys = [k for k in self.may if covers(k, name)]
        return max(keys, key=len) if keys else None


_LINE = re.compile(r"^([\w.]+)\s*(->|<-)\s*(.*)$")


def parse_rules(text: str) -> Rules:
    """The rules of the first fenced block marked ``imports`` in ``text`` (Markdown):

    - ``A -> b, c.d, e (lazy)``: the modules under ``A`` import only ``b`` and ``c.d`` and what
      lies under them (and ``e`` only inside functions), besides modules of their own top-level
      package and the ``fedq`` package itself; an empty right side: nothing;
    - ``pkg <- a, b (lazy)``: of fedq's modules, only those under ``a`` or ``b`` import the
      package ``pkg`` (``b`` only inside functions);
    - ``#`` starts a comment; a line ending in ``,`` continues on the next."""
    m = re.search(r"^```imports[ \t]*\n(.*?)^```", text, re.M | re.S)
    if not m:
        raise ValueError("no ```imports block")
    rules = Rules()
    joined = re.sub(r",[ \t]*(#[^\n]*)?\n\s*", ", ", m.group(1))
    for raw in joined.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        got = _LINE.match(line)
        if not got:
            raise ValueError(f"unreadable rule: {raw!r}")
        left, arrow, right = got.groups()
        entries = [e.strip() for e in right.split(",") if e.strip()]
        table = rules.may if arrow == "->" else rules.only
        if left in table:
            raise ValueError(f"two rules for {left}")
        table[left] = {e.removesuffix("(lazy)").strip(): e.endswith("(lazy)") for e in entries}
    return rules


def read_rules(path: Path = DESIGN) -> Rules:
    return parse_rules(path.read_text())


def violations(
    rules: Rules, graph: dict[str, set[str]], eager: dict[str, set[str]]
) -> tuple[list[str], set[tuple[str, str]]]:
    """What breaks ``rules`` in ``graph`` (module -> imports, outside packages included) given
    ``eager`` (the imports that run at import time), and the (key, entry) pairs some import used.
    """
    bad: list[str] = []
    used: set[tuple[str, str]] = set()
    for module, targets in sorted(graph.items()):
        name = short(module)
        if name == "":  # fedq/__init__.py: light, it imports none of the rest
            bad += [f"fedq imports {t}" for t in sorted(targets) if t.split(".")[0] in ROOTS]
            continue
        key = rules.key_of(name)
        if key is None:
            bad.append(f"{module}: no rule in docs/design.md")
            continue
        for target in sorted(targets):
            t = short(target)
            if t in rules.only or target in rules.only:
                pkg = t if t in rules.only else target
                allowed = [a for a in rules.only[pkg] if covers(a, name)]
                if not allowed:
                    bad.append(f"{module} imports {pkg} (only {', '.join(rules.only[pkg])} may)")
                elif all(rules.only[pkg][a] for a in allowed) and target in eager[module]:
                    bad.append(f"{module} imports {pkg} at import time (allowed only lazily)")
                used.update((pkg, a) for a in allowed)
                continue
            if target.split(".")[0] not in ROOTS:
                continue  # an outside package no rule guards
            if t == "" or t.split(".")[0] == name.split(".")[0]:
                continue  # the fedq package, or a module of the importer's own package
            entries = [e for e in rules.may[key] if covers(e, t)]
            if not entries:
                bad.append(f"{module} imports {target} (rule {key!r})")
                continue
            used.update((key, e) for e in entries)
            if all(rules.may[key][e] for e in entries) and target in eager[module]:
                bad.append(f"{module} imports {target} at import time (allowed only lazily)")
    return bad, used
