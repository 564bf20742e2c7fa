"""A site's own data, as ``fedq join --data`` reads it and as a simulation's site with ``data``
(:class:`fedq.runtime.placement.SiteData`) reads it on its worker's node: loading the source,
and checking it against the run's model. Both :mod:`fedq.runtime.deploy` and
:mod:`fedq.runtime.placement` import this module (it imports neither)."""

from __future__ import annotations

from typing import Any

from fedq.errors import ConfigError, FedqError
from fedq.wire.control import Joined


def load_site_data(source: str, seed: int = 0) -> Any:
    """A site's own training data: every row of ``source`` (``npz:``, ``csv:``, ``py:`` or a
    built-in data set's training split), in file order."""
    from fedq.data import check_dataset_name, load_dataset

    problem = check_dataset_name(source)
    if problem:
        raise ConfigError(f"--data: {problem}")
    if ":" in source:
        return load_dataset(source, seed=seed, test_fraction=0.0).train
    return load_dataset(source, seed=seed).train


def check_site_data(data: Any, joined: Joined) -> None:
    """The site's data must fit the model the server runs."""
    import json

    model = json.loads(joined.config_json).get("model", {})
    records = getattr(data, "records", None) is not None
    causal = _causal(model)
    if causal and not records:
        raise FedqError(
            f"--data is labelled data, but the run fine-tunes the causal LM {model.get('name')!r}"
            " on instruction or text records (a jsonl: source)"
        )
    if records and not causal:
        raise FedqError(
            f"--data holds instruction records, but the run's model {model.get('name')!r} is "
            "a classifier"
        )
    n_cls = int(joined.num_classes)
    top = int(data.y.max()) + 1 if len(data) else 0
    if top > n_cls:
        raise FedqError(
            f"--data has labels up to {top - 1}, but the run's model has {n_cls} classes"
        )
    x = getattr(data, "x", None)
    if joined.input_dim and (x is None or x.dim() != 2 or int(x.shape[1]) != joined.input_dim):
        shape = None if x is None else list(x.shape)
        raise FedqError(
            f"--data has features of shape {shape}, but the run's model takes "
            f"{joined.input_dim} features per example"
        )
    if not joined.input_dim and x is not None:
        raise FedqError("--data holds arrays, but the run's model reads text (a csv: source)")


def _causal(model: dict[str, Any]) -> bool:
    """Whether the run's model (its resolved config section) is a causal LM; a checkpoint this
    site cannot read counts as not (its own ``--model`` copy is checked when it builds)."""
    from fedq.config import config_from_dict
    from fedq.runtime.preflight import model_task

    try:
        cfg = config_from_dict({"model": model})
        return model_task(cfg) == "causal_lm"
    except ConfigError:
        return False
