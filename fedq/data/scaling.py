"""Feature scale: per-site standardization (``data.standardize``) and the warning that suggests it.

Unscaled tabular features (a column in the thousands beside one below 1, as in scikit-learn's
breast-cancer data) make plain SGD on a small MLP predict the majority class and stop there.
Standardizing fixes that, but fitting a mean and a standard deviation on the pooled data would
mean moving data (or its statistics) between sites. So each client standardizes its own training
rows with statistics fitted on those rows only, and the server standardizes its own evaluation
data with that data's own statistics: nothing crosses a site. The price: the sites' inputs are on
slightly different scales (a site with a skewed share of the classes centres them differently), and
the server's evaluation uses statistics of the evaluation set itself (label-free, but fitted on
the rows it scores); with IID shards of one data set these are all close to the pooled statistics.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedq.data.datasets import AnyDataset, ArrayDataset, Shard
from fedq.errors import ConfigError

#: A feature column whose mean or standard deviation exceeds this in absolute value is "far from
#: unit scale" (the warning's threshold).
SCALE_LIMIT = 10.0
#: At most about this many rows (evenly spaced) are read for the warning.
SAMPLE_ROWS = 10_000


def check_standardizable(data: AnyDataset, what: str = "data set") -> ArrayDataset:
    """``data`` itself when it has float features; else a ConfigError for ``data.standardize``."""
    if not isinstance(data, ArrayDataset) or not data.x.is_floating_point():
        kind = "text" if not isinstance(data, ArrayDataset) else "integer token ids"
        raise ConfigError(
            f"data.standardize: {what} {data.name!r} holds {kind}, not numeric "
            "features; standardize only tabular or image data"
        )
    return data


def standardized(data: AnyDataset, what: str = "data set") -> ArrayDataset:
    """``data`` with every feature centred and scaled by its own rows' mean and standard
    deviation (a constant feature is only centred)."""
    ds = check_standardizable(data, what)
    x = ds.x.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0) if len(ds) > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return ArrayDataset(((x - mean) / std).to(ds.x.dtype), ds.y, ds.num_classes, ds.name)


def standardize_shards(shards: Mapping[str, Shard]) -> dict[str, Shard]:
    """Each client's shard standardized with statistics of its own rows only."""
    return {
        cid: Shard.whole(standardized(sh.data.subset(sh.idx), f"client {cid}'s data"))
        for cid, sh in shards.items()
    }


def scale_warning(data: AnyDataset, where: str) -> str | None:
    """A line suggesting ``data.standardize: true`` when ``data``'s float features are far from
    unit scale (a column's |mean| or std above :data:`SCALE_LIMIT`), else None."""
    if not isinstance(data, ArrayDataset) or not data.x.is_floating_point() or len(data) < 2:
        return None
    step = max(1, len(data) // SAMPLE_ROWS)  # an estimate is enough: a bounded cost
    x = data.x[::step].reshape(-1, data.input_dim).double()
    mean, std = x.mean(dim=0).abs(), x.std(dim=0, correction=0)
    worst = torch.maximum(mean, std)
    col = int(worst.argmax())
    if float(worst[col]) <= SCALE_LIMIT:
        return None
    m, sd = float(x[:, col].mean()), float(std[col])
    return (
        f"{where}: features are far from unit scale (column {col}: mean {m:.4g}, std "
        f"{sd:.4g}); plain SGD may then learn only the majority class: set "
        "data.standardize: true"
    )
