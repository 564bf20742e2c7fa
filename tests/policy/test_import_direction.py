"""Imports flow one way, as the ``imports`` block of docs/design.md ("Module map") states it: that
block is the one statement of the rules, and this test reads it. Every import of every module of
``fedq`` and ``fedq_kernels`` counts (function-level and ``importlib.import_module`` ones too;
not those under ``if TYPE_CHECKING:``); every module must fall under a rule, and every rule must
be used by some import, so the document says what the code does."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.imports import (
    ROOTS,
    covers,
    import_graph,
    imports,
    parse_rules,
    read_rules,
    violations,
)

RULES = read_rules()


def _check() -> tuple[list[str], set[tuple[str, str]]]:
    return violations(RULES, import_graph(outside=True), import_graph(lazy=False, outside=True))


def test_the_rules_are_read_from_the_design_document() -> None:
    assert {"errors", "codec", "codec.dispatch", "fedq_kernels", "runtime", "cli"} <= set(RULES.may)
    assert RULES.may["codec.dispatch"] == {"fedq_kernels": True}
    assert "grpc" in RULES.only and "wire" not in RULES.only["grpc"]


def test_every_top_level_module_has_a_rule() -> None:
    """A new package or single-file module must be placed in the order before it can land."""
    tops = {
        p.stem for p in ROOTS["fedq"].iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    missing = sorted(tops - {"__init__"} - set(RULES.may))
    assert not missing, f"add a rule to docs/design.md for: {missing}"


def test_every_rule_names_a_module_that_exists() -> None:
    names = {m.removeprefix("fedq.") for m in import_graph()}
    named = set(RULES.may) | {e for may in RULES.may.values() for e in may}
    named |= {a for importers in RULES.only.values() for a in importers}
    gone = sorted(n for n in named if not any(covers(n, m) for m in names))
    assert not gone, gone


def test_imports_follow_the_rules() -> None:
    bad, _ = _check()
    assert not bad, "\n".join(bad)


def test_every_rule_is_used() -> None:
    """No rule allows more than the code does (the document would describe a looser design)."""
    _, used = _check()
    unused = [f"{k} -> {e}" for k, may in RULES.may.items() for e in may if (k, e) not in used]
    unused += [
        f"{p} <- {a}"
        for p, importers in RULES.only.items()
        for a in importers
        if (p, a) not in used
    ]
    assert not unused, f"rules no import uses (docs/design.md): {unused}"


def test_the_checker_catches_what_breaks_a_rule() -> None:
    rules = parse_rules(
        "text\n```imports\nlow ->\nhigh -> low,  # continued\n  mid\nmid -> low\n"
        "mid.lazy -> high (lazy)\nnet <- high\nheavy <- mid (lazy)\n```\n"
    )
    assert rules.may == {
        "low": {},
        "high": {"low": False, "mid": False},
        "mid": {"low": False},
        "mid.lazy": {"high": True},
    }
    graph = {
        "fedq.low": {"fedq.mid"},  # upwards
        "fedq.mid": {"fedq.low", "net"},  # a guarded outside package
        "fedq.mid.lazy": {"fedq.high", "fedq.mid"},  # lazily: fine; its own package: fine
        "fedq.mid.eager": {"fedq.high", "heavy"},  # under mid's rule, not mid.lazy's
        "fedq.high": {"fedq.low.x", "fedq", "numpy"},
        "fedq.other": set(),
    }
    eager = {m: set() for m in graph} | {"fedq.mid.eager": {"fedq.high", "heavy"}}
    bad, used = violations(rules, graph, eager)
    assert bad == [
        "fedq.low imports fedq.mid (rule 'low')",
        "fedq.mid imports net (only high may)",
        "fedq.mid.eager imports fedq.high (rule 'mid')",
        "fedq.mid.eager imports heavy at import time (allowed only lazily)",
        "fedq.other: no rule in docs/design.md",
    ]
    assert rules.only == {"net": {"high": False}, "heavy": {"mid": True}}
    assert used == {("mid", "low"), ("mid.lazy", "high"), ("high", "low"), ("heavy", "mid")}
    eager["fedq.mid.lazy"] = {"fedq.high"}
    assert (
        "fedq.mid.lazy imports fedq.high at import time (allowed only lazily)"
        in violations(rules, graph, eager)[0]
    )


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "def f():\n    from fedq.split.models import x\n    import fedq.runtime\n    import grpc\n"
    )
    known = {"fedq.split", "fedq.split.models", "fedq.runtime"}
    assert imports("fedq.m", f, known) == {"fedq.split.models", "fedq.runtime"}
    assert imports("fedq.m", f, known, outside=True) == {
        "fedq.split.models",
        "fedq.runtime",
        "grpc",
    }
    assert imports("fedq.m", f, known, lazy=False) == set()


@pytest.mark.parametrize("broken", ["```imports\nfed => rounds\n```", "no block here"])
def test_an_unreadable_block_is_an_error(broken: str) -> None:
    with pytest.raises(ValueError):
        parse_rules(broken)
