"""User data sources: npz, csv (string or integer labels) and py:module:function."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fedq.data import ArrayDataset, TextDataset, load_dataset
from fedq.errors import ConfigError


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def test_npz_without_test_arrays_is_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 5)), np.repeat(np.arange(4), 25)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    d = load_dataset(f"npz:{tmp_path / 'mine.npz'}", seed=3)
    assert isinstance(d.train, ArrayDataset)
    assert (len(d.train), len(d.test)) == (80, 20)
    assert d.num_classes == 4 and d.name == "mine"
    assert d.train.x.dtype == torch.float32
    # every row lands on exactly one side, unchanged
    both = torch.cat([d.train.x, d.test.x]).double()
    assert torch.allclose(
        torch.sort(both[:, 0]).values, torch.sort(torch.from_numpy(x[:, 0])).values
    )


def test_npz_with_test_arrays_and_token_ids(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.int32).reshape(10, 4)
    np.savez(tmp_path / "t.npz", x=x, y=np.arange(10) % 3, x_test=x[:2], y_test=np.array([0, 5]))
    d = load_dataset(f"npz:{tmp_path / 't.npz'}")
    assert (len(d.train), len(d.test)) == (10, 2)
    assert d.train.x.dtype == torch.int64  # token ids stay integers
    assert d.num_classes == 6 and d.test.y.tolist() == [0, 5]


def test_npz_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    np.savez(tmp_path / "noy.npz", x=np.zeros((3, 2)))
    with pytest.raises(ConfigError, match="missing arrays"):
        load_dataset(f"npz:{tmp_path / 'noy.npz'}")
    np.savez(tmp_path / "obj.npz", x=np.zeros((3, 2)), y=np.array([{}, {}, {}], dtype=object))
    with pytest.raises(ConfigError, match="npz"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")
    with pytest.raises(ConfigError, match="unknown option"):
        load_dataset(f"npz:{tmp_path / 'noy.npz'}", max_rows=3)


def test_csv_string_labels_map_to_sorted_ids(tmp_path: Path) -> None:
    rows = [(f"text {i}", "pos" if i % 3 else "neg") for i in range(30)]
    d = load_dataset(f"csv:{_write_csv(tmp_path / 'rev.csv', rows)}")
    assert isinstance(d.train, TextDataset)
    assert len(d.train) + len(d.test) == 30 and d.num_classes == 2
    for text, label in zip(d.train.texts, d.train.y.tolist(), strict=True):
        i = int(text.split()[1])
        assert label == (1 if i % 3 else 0)  # "neg" < "pos"


def test_csv_integer_labels_and_test_file(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "a.csv", [("x", "2"), ("y", "0"), ("z", "2")])
    test = _write_csv(tmp_path / "b.csv", [("w", "1")])
    d = load_dataset(f"csv:{train}", test_path=str(test))
    assert d.train.y.tolist() == [2, 0, 2] and d.test.y.tolist() == [1]
    assert d.num_classes == 3 and d.test.texts == ["w"]


def test_csv_without_required_columns(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("sentence,label\nhi,1\n")
    with pytest.raises(ConfigError, match="'text' and 'label'"):
        load_dataset(f"csv:{p}")


def test_py_source_returns_arrays_or_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_fedq_data.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from fedq.data import load_dataset

            def arrays(n=50):
                return np.ones((n, 3), dtype=np.float32), np.arange(n) % 2

            def split():
                return load_dataset("digits")

            def seeded(seed):
                rng = np.random.default_rng(seed)
                return rng.normal(size=(30, 2)), np.arange(30) % 3

            not_callable = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    d = load_dataset("py:my_fedq_data:arrays", n=40)
    assert len(d.train) + len(d.test) == 40 and d.num_classes == 2
    assert load_dataset("py:my_fedq_data:split", seed=4).num_classes == 10
    a = load_dataset("py:my_fedq_data:seeded", seed=1, max_train=10)
    b = load_dataset("py:my_fedq_data:seeded", seed=2)
    assert len(a.train) == 10 and not torch.equal(a.test.x, b.test.x)
    with pytest.raises(ConfigError, match="cannot import"):
        load_dataset("py:no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="no callable"):
        load_dataset("py:my_fedq_data:not_callable")
    with pytest.raises(ConfigError, match="module:function"):
        load_dataset("py:justonepart")
