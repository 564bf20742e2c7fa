"""Seeded, stratified train/test holdout for data sets that ship without a fixed test set.

Written with a numpy ``Generator`` rather than scikit-learn so that importing and loading stay
light, and so the split depends only on the labels and the seed: every process (server, each
client worker) derives the same split without shipping index lists around.
"""

from __future__ import annotations

import numpy as np

from fedq.errors import ConfigError


def stratified_holdout(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(train_idx, test_idx)``; each class puts about ``test_fraction`` of rows in test.

    Per class, ``round(n_c * test_fraction)`` rows go to test (at least one when a class has two or
    more rows and the fraction is positive), so small classes are represented on both sides. A
    fraction of 0 keeps every row for training, in file order (a ``fedq join`` site's own data).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    if test_fraction == 0.0:
        return np.arange(len(labels), dtype=np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(rows) * test_fraction)
        if len(rows) >= 2:
            n_test = min(max(n_test, 1), len(rows) - 1)
        test_parts.append(rows[:n_test])
        train_parts.append(rows[n_test:])
    train = rng.permutation(np.concatenate(train_parts)) if train_parts else np.zeros(0, np.int64)
    test = rng.permutation(np.concatenate(test_parts)) if test_parts else np.zeros(0, np.int64)
    return train.astype(np.int64), test.astype(np.int64)
