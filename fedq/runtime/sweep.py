"""``fedq sweep``: a grid of runs (e.g. epsilon x bit policy) in parallel on Ray.

A sweep file names a base scenario, optional overrides for every run, and a grid. Each grid axis is
either a dotted scenario key with a list of values, or a label with named variants (each a mapping
of dotted keys to values). Every run's configuration is validated before any run starts. Each run
is a whole ``simulate`` in one Ray task (server, clients and real gRPC on loopback inside it), so
up to ``parallel`` runs share the machine's cores; each writes its usual folder.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedq.config import RunConfig, config_from_dict, read_yaml_mapping, set_dotted
from fedq.errors import ConfigError
from fedq.runtime.preflight import check_names

log = logging.getLogger(__name__)

SWEEP_KEYS = ("name", "scenario", "set", "grid", "parallel")


@dataclass
class SweepRun:
    label: str
    values: dict[str, Any]
    config: RunConfig


@dataclass
class Sweep:
    name: str
    runs: list[SweepRun]
    parallel: int
    axes: list[str] = field(default_factory=list)


def _label(value: Any) -> str:
    text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def _axis(key: str, spec: Any, problems: list[str]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(label, reported value, overrides) for each point of one axis."""
    if isinstance(spec, list) and spec:
        return [(f"{key.split('.')[-1]}={_label(v)}", v, {key: v}) for v in spec]
    if isinstance(spec, dict) and spec:
        out = []
        for name, sets in spec.items():
            if not isinstance(sets, dict):
                problems.append(f"grid.{key}.{name}: expected a mapping of key: value")
                continue
            out.append((_label(name), name, dict(sets)))
        return out
    problems.append(f"grid.{key}: expected a non-empty list of values or mapping of variants")
    return []


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every problem of every run is reported at once."""
    p = Path(path)
    raw = read_yaml_mapping(p, "sweep")
    problems = [
        f"{k}: unknown key (allowed: {', '.join(SWEEP_KEYS)})" for k in raw if k not in SWEEP_KEYS
    ]
    base_path = raw.get("scenario")
    base: dict[str, Any] = {}
    if not isinstance(base_path, str):
        problems.append("scenario: the base scenario file is required")
    else:
        bp = (p.parent / base_path) if not Path(base_path).is_absolute() else Path(base_path)
        try:
            base = read_yaml_mapping(bp, "scenario")
        except ConfigError as e:
            problems += [f"scenario: {x}" for x in e.problems]
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        problems.append("set: expected a mapping of key: value")
        common = {}
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        problems.append("grid: expected a non-empty mapping of axes")
        grid = {}
    parallel = raw.get("parallel", 0)
    if not isinstance(parallel, int) or parallel < 0:
        problems.append(f"parallel: expected an integer >= 0 (0 = one per core), got {parallel!r}")
        parallel = 0
    axes = {k: _axis(str(k), v, problems) for k, v in grid.items()}
    runs: list[SweepRun] = []
    for combo in itertools.product(*axes.values()):
        label = "-".join(c[0] for c in combo)
        raw_cfg = copy.deepcopy(base)
        sets = {**common}
        for _, _, o in combo:
            sets.update(o)
        sets.setdefault("name", f"{raw.get('name', p.stem)}-{label}")
        try:
            for k, v in sets.items():
                set_dotted(raw_cfg, k, v)
            cfg = config_from_dict(raw_cfg)
            check_names(cfg)
        except ConfigError as e:
            problems += [f"run {label}: {x}" for x in e.problems]
            continue
        runs.append(SweepRun(label, {k: c[1] for k, c in zip(axes, combo, strict=True)}, cfg))
    if problems:
        raise ConfigError(problems)
    n = parallel or os.cpu_count() or 1
    return Sweep(str(raw.get("name", p.stem)), runs, n, list(axes))


def _run_one(cfg: RunConfig, out: str) -> dict[str, Any]:
    import dataclasses

    from fedq.runtime.simulate import simulate

    # One run = one process: the server, its clients and real gRPC on loopback live in this task.
    rt = dataclasses.replace(cfg.runtime, backend="inprocess")
    return simulate(dataclasses.replace(cfg, runtime=rt), out)


def run_sweep(
    sweep: Sweep, out_dir: str | Path, *, on_done: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run every point of the grid (up to ``sweep.parallel`` at once); write the sweep tables
    and plots; return one row per run."""
    from fedq.report.sweep import write_sweep_outputs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def record(run: SweepRun, summary: dict[str, Any]) -> None:
        row = {"label": run.label, **run.values, **summary, "out_dir": str(out / run.label)}
        rows.append(row)
        if on_done:
            on_done(row)

    if sweep.parallel <= 1 or len(sweep.runs) == 1:
        for run in sweep.runs:
            record(run, _run_one(run.config, str(out / run.label)))
    else:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        started = not ray.is_initialized()
        if started:
            ray.init(
                num_cpus=sweep.parallel,
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=256 << 20,
            )
        try:
            task = ray.remote(num_cpus=1)(_run_one)
            pending = {task.remote(r.config, str(out / r.label)): r for r in sweep.runs}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                run = pending.pop(done[0])
                record(run, ray.get(done[0]))
        finally:
            if started:
                ray.shutdown()
    order = {r.label: i for i, r in enumerate(sweep.runs)}
    rows.sort(key=lambda row: order[row["label"]])
    write_sweep_outputs(out, rows, sweep.axes)
    return rows
