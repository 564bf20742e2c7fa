"""Benchmark suite (``fedq bench NAME``). Each module ``fedq.bench.<name>`` exposes
``add_arguments(parser)`` and ``run(args) -> dict`` (printing a table; ``--json PATH`` writes the
dict)."""

BENCHES = (
    "codec",
    "fl",
    "dp",
    "split",
    "transport",
    "kernels",
    "flood",
    "scale",
    "faults",
    "robust",
    "llm",
    "base",
)
