"""Split a training set across clients: IID, Dirichlet label skew, or k classes per client.

These are the standard non-IID benchmarks of federated learning: ``dirichlet`` follows Hsu et al.
2019 ("Measuring the effects of non-identical data distribution", arXiv:1909.06335) as used in
NIID-Bench (Li et al. 2021, arXiv:2102.02079); ``classes`` is the "#C = k" label-quantity skew of
NIID-Bench and the pathological shards of McMahan et al. 2017. Everything is driven by one numpy
``Generator`` seeded by ``seed``, so every process derives the same client shards.

Each sample goes to at most one client and every client gets at least ``min_size`` samples.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedq.errors import ConfigError

Parts = list[np.ndarray]


def _iid(labels: np.ndarray, k: int, rng: np.random.Generator, **_: object) -> Parts:
    return list(np.array_split(rng.permutation(len(labels)), k))


def _dirichlet(
    labels: np.ndarray,
    k: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    min_size: int,
    max_tries: int,
    **_: object,
) -> Parts:
    """Per class, draw client shares p ~ Dir(alpha) and cut that class's shuffled rows by p.

    Small ``alpha`` concentrates each class on few clients; a draw that leaves a client below
    ``min_size`` is redrawn (whole partition), at most ``max_tries`` times.
    """
    if alpha <= 0:
        raise ConfigError(f"dirichlet partition: alpha must be > 0, got {alpha}")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for _try in range(max_tries):
        # a draw is judged by its sizes alone; the rows are cut only for the draw that is kept
        draw = []
        sizes = np.zeros(k, dtype=np.int64)
        for rows in by_class:
            rows = rng.permutation(rows)
            shares = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
            sizes += np.diff(cuts, prepend=0, append=len(rows))
            draw.append((rows, cuts))
        smallest = int(sizes.min())
        if smallest >= min_size:
            parts: list[list[np.ndarray]] = [[] for _ in range(k)]
            for rows, cuts in draw:
                for client, chunk in enumerate(np.split(rows, cuts)):
                    parts[client].append(chunk)
            return [np.concatenate(p) for p in parts]
    raise ConfigError(
        f"dirichlet partition: after {max_tries} draws some client still had fewer than "
        f"{min_size} samples (last draw: {smallest}); use a larger alpha, fewer clients "
        "or a smaller min_size"
    )


def _classes(
    labels: np.ndarray, k: int, rng: np.random.Generator, *, classes_per_client: int, **_: object
) -> Parts:
    """Client i holds classes ``perm[(i*c + j) % C]``, ``j < c``: exactly c distinct classes each,
    and every class is held by someone whenever ``num_clients * c >= C``. Each class's shuffled rows
    are split evenly among its holders; rows of unheld classes are left out.
    """
    present = np.unique(labels)
    n_cls, c = len(present), classes_per_client
    if not 1 <= c <= n_cls:
        raise ConfigError(
            f"classes partition: classes_per_client must be in [1, {n_cls}] "
            f"(the number of classes present), got {c}"
        )
    order = rng.permutation(present)
    holders: dict[int, list[int]] = {int(cls): [] for cls in present}
    for client in range(k):
        for j in range(c):
            holders[int(order[(client * c + j) % n_cls])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for cls, owners in holders.items():
        if not owners:
            continue
        rows = rng.permutation(np.flatnonzero(labels == cls))
        if len(rows) < len(owners):
            raise ConfigError(
                f"classes partition: class {cls} has {len(rows)} samples for {len(owners)} "
                "clients; use fewer clients or fewer classes_per_client"
            )
        for owner, chunk in zip(owners, np.array_split(rows, len(owners)), strict=True):
            parts[owner].append(chunk)
    return [np.concatenate(p) for p in parts]


SCHEMES: dict[str, Callable[..., Parts]] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "classes": _classes,
}


def partition(
    labels: torch.Tensor,
    num_clients: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[torch.Tensor]:
    """Return one sorted ``int64`` index tensor per client into ``labels``.

    ``scheme`` is one of :data:`SCHEMES`. The same ``seed`` gives the same shards in every process.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; registered: {', '.join(SCHEMES)}")
    y = labels.detach().cpu().numpy().reshape(-1)
    problems = []
    if num_clients < 1:
        problems.append(f"num_clients must be >= 1, got {num_clients}")
    if min_size < 1:
        problems.append(f"min_size must be >= 1, got {min_size}")
    if num_clients >= 1 and min_size >= 1 and len(y) < num_clients * min_size:
        problems.append(
            f"{len(y)} samples cannot give {num_clients} clients {min_size} sample(s) each"
        )
    if problems:
        raise ConfigError([f"{scheme} partition: {p}" for p in problems])
    rng = np.random.default_rng(seed)
    parts = SCHEMES[scheme](
        y,
        num_clients,
        rng,
        alpha=alpha,
        classes_per_client=classes_per_client,
        min_size=min_size,
        max_tries=max_tries,
    )
    small = [i for i, p in enumerate(parts) if len(p) < min_size]
    if small:
        raise ConfigError(
            f"{scheme} partition: clients {small} got fewer than {min_size} samples; "
            "use fewer clients"
        )
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def label_histogram(labels: torch.Tensor, idx: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Samples per class among ``labels[idx]`` (length ``num_classes``), for skew reports."""
    picked = labels[idx].to(torch.int64)
    if picked.numel() and (int(picked.min()) < 0 or int(picked.max()) >= num_classes):
        raise ConfigError(f"labels outside [0, {num_classes}) in label_histogram")
    return torch.bincount(picked, minlength=num_classes)
