"""Checks a run needs before any host starts: names against the registries, then what only the
data can tell (a data file that is not there or not readable, bad features or labels, a
partition that cannot give every client a sample), and a GPU asked for on a machine without
one. Every problem is one :class:`~fedq.errors.ConfigError` line naming its key, exactly like a
bad key in the scenario, instead of a failure inside a server actor after start-up.
"""

from __future__ import annotations

import logging
from typing import Any

from fedq.config import RunConfig
from fedq.errors import FOR_USER, ConfigError

log = logging.getLogger(__name__)


def name_problems(cfg: RunConfig) -> list[str]:
    """Registry names the scenario uses that do not exist (reads no data)."""
    from fedq.data import check_dataset_name, dataset_options
    from fedq.models import check_model_name

    problems = []
    data = check_dataset_name(cfg.data.name)
    if data:
        problems.append(f"data.name: {data}")
    elif cfg.data.num_samples is not None and "num_samples" not in dataset_options(cfg.data.name):
        problems.append(
            f"data.num_samples: data set {cfg.data.name!r} has a fixed size; only a "
            "generated one (mnist1d) takes a number of rows"
        )
    for i, site in enumerate(cfg.runtime.sites):
        source = None if site.data is None else check_dataset_name(site.data)
        if source:
            problems.append(f"runtime.sites[{i}].data: {source}")
    model = check_model_name(cfg.model.name, cfg.mode)
    if model:
        problems.append(f"model.name: {model}")
    elif cfg.model.packed_base and model_task(cfg) != "causal_lm":
        key = "base_bits" if cfg.model.base_bits is not None else "base_budget_mb"
        problems.append(
            f"model.{key}: a packed frozen base is offered for causal LMs (hf: checkpoints, "
            f"smollm2_instruct) so far; {cfg.model.name!r} is not one"
        )
    elif cfg.model.gradient_checkpointing and model_task(cfg) != "causal_lm":
        problems.append(
            "model.gradient_checkpointing: offered for causal LMs (hf: checkpoints, "
            f"smollm2_instruct) so far; {cfg.model.name!r} is not one"
        )
    elif model_task(cfg) == "causal_lm" and cfg.privacy.mechanism == "dpsgd":
        problems.append(
            "privacy.mechanism: 'dpsgd' is not offered for causal-LM fine-tuning (fedq's "
            "DP-SGD clips per-example gradients of a classification loss; a per-example "
            "token loss over a PEFT-wrapped LM is not wired to Opacus); use 'laplace' or "
            "'central' (noise on the clipped updates), which work for any model"
        )
    return problems


def model_task(cfg: RunConfig) -> str:
    """The task the run trains: ``model.task`` when set, else the model's own."""
    from fedq.models import model_entry

    if cfg.model.task != "auto":
        return cfg.model.task
    entry = model_entry(cfg.model.name)
    return "classification" if entry is None else entry.task


def check_names(cfg: RunConfig) -> None:
    problems = name_problems(cfg)
    if problems:
        raise ConfigError(problems)


def client_sizes(cfg: RunConfig) -> list[int]:
    """Load the data and cut it into the run's client shards; returns each client's size. A
    problem the data reveals is a ConfigError naming the keys involved (a problem in the data
    file itself names the file); features far from unit scale are logged as a warning."""
    from fedq.runtime.setup import client_partitions, load_data

    check_names(cfg)
    try:
        split = load_data(cfg)
    except ConfigError as e:
        raise ConfigError([f"data.name: {p}" for p in e.problems]) from None
    check_data(cfg, split)
    try:
        parts = client_partitions(cfg, split.train)
    except ConfigError as e:
        d = cfg.data
        where = (
            f"data.name={d.name!r}, data.partition={d.partition!r}, "
            f"rounds.num_clients={cfg.rounds.num_clients}"
        )
        raise ConfigError([f"{p} ({where})" for p in e.problems]) from None
    return [int(p.numel()) for p in parts]


def check_data(cfg: RunConfig, split: Any) -> None:
    """What the loaded data says about the scenario: a training set of one class (nothing to
    learn; the run would report a perfect accuracy), ``data.standardize`` on data without float
    features, and (as a warning) features far from unit scale without it."""
    import torch

    from fedq.data.scaling import check_standardizable, scale_warning

    name = cfg.data.name
    from fedq.modes import get_mode

    problem = get_mode(cfg.mode).data_problem(cfg, split.train, model_task(cfg))
    if problem:
        raise ConfigError(f"data.name: {problem}")
    if getattr(split.train, "task", "classification") == "causal_lm":
        return  # records: no classes, no features to scale
    seen = torch.unique(split.train.y).tolist()
    if len(seen) < 2:
        raise ConfigError(
            f"data.name: every training label of {name!r} is class {seen[0]}; a "
            "classifier needs two or more classes"
        )
    if cfg.data.standardize:
        try:
            check_standardizable(split.train, "data set")
        except ConfigError as e:
            raise ConfigError(f"{e.problems[0]} (data.name={name!r})") from None
    else:
        warning = scale_warning(split.train, f"data.name {name!r}")
        if warning:
            log.warning(warning, extra=FOR_USER)


def preflight(cfg: RunConfig) -> dict[str, Any]:
    """Everything checkable before start-up, for a simulated run (which holds every client's
    data): the names, the data and its partition, and (hosts on this machine) the device.
    Sites with their own data (``runtime.sites[i].data``) are read where their workers run, so
    only their names are checked here; when every site has its own, ``data.name`` is only the
    server's evaluation data and is not partitioned. Returns facts the driver may print."""
    sites = cfg.runtime.sites
    if sites and all(s.data is not None for s in sites):
        check_names(cfg)
        sizes: list[int] = []
    else:
        sizes = client_sizes(cfg)
    if not cfg.runtime.ray_address:  # a cluster may have the GPU this machine lacks
        from fedq.runtime.setup import torch_device

        torch_device(cfg.runtime.device)
    return {"client_sizes": sizes, "train_examples": sum(sizes)}
