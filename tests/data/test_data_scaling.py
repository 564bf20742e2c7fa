"""``data.standardize`` (each client on its own rows, the server's evaluation data on its own), the
scale warning, the collapse warning, and the label and feature checks of user data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fedq.config import config_from_dict
from fedq.data import ArrayDataset, Shard, TextDataset, load_dataset
from fedq.data.scaling import scale_warning, standardize_shards, standardized
from fedq.data.user import MAX_CLASSES, encode_labels
from fedq.errors import ConfigError


def _data(n: int = 60, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g) * torch.tensor([1000.0, 0.01, 5.0]) + torch.tensor(
        [500.0, -2.0, 0.0]
    )
    return ArrayDataset(x, torch.arange(n) % 2, 2, "toy")


def test_each_shard_is_standardized_with_its_own_rows_only() -> None:
    data = _data()
    a, b = torch.arange(0, 20), torch.arange(20, 60)
    out = standardize_shards({"client-0": Shard(data, a), "client-1": Shard(data, b)})
    for cid, rows in (("client-0", a), ("client-1", b)):
        sh = out[cid]
        own = data.x[rows].double()
        want = (own - own.mean(0)) / own.std(0, correction=0)
        assert sh.size == rows.numel() and torch.equal(sh.data.y[sh.idx], data.y[rows])
        assert torch.allclose(sh.data.x[sh.idx].double(), want, atol=1e-5)
        # the pooled statistics would give something else: nothing crossed between the shards
        pooled = (own - data.x.double().mean(0)) / data.x.double().std(0, correction=0)
        assert not torch.allclose(sh.data.x[sh.idx].double(), pooled, atol=1e-2)
    assert torch.equal(data.x, _data().x)  # the run's data is left as it was


def test_a_constant_feature_is_centred_and_one_row_left_finite() -> None:
    x = torch.tensor([[1.0, 7.0], [3.0, 7.0], [5.0, 7.0]])
    out = standardized(ArrayDataset(x, torch.tensor([0, 1, 0]), 2, "c"))
    assert torch.equal(out.x[:, 1], torch.zeros(3))
    assert torch.allclose(out.x[:, 0], torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4)
    one = standardized(ArrayDataset(x[:1], torch.tensor([0]), 2, "c"))
    assert torch.isfinite(one.x).all()


def test_standardize_refuses_text_and_token_ids() -> None:
    text = TextDataset(["a", "b"], torch.tensor([0, 1]), 2, "t")
    with pytest.raises(ConfigError, match=r"data\.standardize: .* holds text"):
        standardized(text)
    ids = ArrayDataset(torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1]), 2, "ids")
    with pytest.raises(ConfigError, match="holds integer token ids"):
        standardized(ids)


def test_the_server_standardizes_its_evaluation_data_with_its_own_statistics() -> None:
    from fedq.modes import get_mode

    data = _data(80)
    split = type("Split", (), {"train": data, "test": _data(40, seed=1)})()
    for standardize in (False, True):
        cfg = config_from_dict({"data": {"standardize": standardize}})
        workload = get_mode(cfg.mode).server_workload(
            cfg, split, 2, int(data.x.shape[1]), torch.device("cpu")
        )
        test = workload.test_data  # type: ignore[attr-defined]
        if standardize:
            own = split.test.x.double()
            want = (own - own.mean(0)) / own.std(0, correction=0)
            assert torch.allclose(test.x.double(), want, atol=1e-5)
        else:
            assert test is split.test


def test_standardize_is_a_strict_bool_and_not_for_split_mode() -> None:
    assert config_from_dict({}).data.standardize is False
    with pytest.raises(ConfigError, match=r"data\.standardize: expected bool, got int 1"):
        config_from_dict({"data": {"standardize": 1}})
    with pytest.raises(ConfigError, match=r"data\.standardize: mode 'split' reads text"):
        config_from_dict({"mode": "split", "data": {"standardize": True}})


def test_scale_warning_names_the_worst_column() -> None:
    line = scale_warning(_data(), "data.name 'toy'")
    assert line is not None and line.startswith("data.name 'toy': features are far from unit")
    assert "(column 0: mean" in line and line.endswith("set data.standardize: true")
    assert scale_warning(standardized(_data()), "x") is None
    assert scale_warning(TextDataset(["a", "b"], torch.tensor([0, 1]), 2, "t"), "x") is None


def test_evaluation_counts_predictions_and_spots_a_collapse() -> None:
    from fedq.fed.train import collapsed_class, evaluation
    from fedq.models import build_model

    data = _data()
    bundle = build_model("mlp", num_classes=2, input_dim=3, seed=0, hidden=8)
    out = evaluation(bundle, data)
    assert sum(out["predictions"]) == len(data) and len(out["predictions"]) == 2
    assert collapsed_class([0, 0, 9]) == 2
    assert collapsed_class([3, 0, 9]) is None
    assert collapsed_class([1, 0]) is None  # one row proves nothing


def test_the_recorder_warns_once_when_the_model_predicts_one_class(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedq.runtime.recorder import RunRecorder

    rec = RunRecorder(tmp_path, config_from_dict({}))
    base = {"bytes_up": 1, "bytes_down": 1, "clients_selected": 1, "accuracy": 0.625}
    with caplog.at_level(logging.WARNING, logger="fedq.runtime.recorder"):
        for r in range(3):
            out = rec.round({**base, "round": r, "predictions": [0, 5, 0]}, 0.0)
            assert "predictions" not in out  # not a metric: metrics.jsonl keeps its keys
    lines = [r for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(lines) == 1 and getattr(lines[0], "fedq_for_user", False)
    assert (
        lines[0]
        .getMessage()
        .startswith(
            "round 0: the model predicts class 1 for all 5 evaluation rows (accuracy 0.6250)"
        )
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedq.runtime.recorder"):
        RunRecorder(tmp_path / "b", config_from_dict({})).round(
            {**base, "round": 0, "predictions": [2, 3, 0]}, 0.0
        )
    assert not caplog.records


def test_labels_whole_floats_are_classes_fractions_and_huge_ids_are_not() -> None:
    ids, k = encode_labels(np.array([0.0, 2.0, 1.0]), "f")
    assert ids.tolist() == [0, 2, 1] and k == 3
    ids, k = encode_labels(np.array([True, False]), "f")
    assert ids.tolist() == [1, 0] and k == 2
    with pytest.raises(
        ConfigError,
        match=r"f: labels must be class indices \(whole numbers\), "
        r"got nan at row 1",
    ):
        encode_labels(np.array([0.0, np.nan]), "f")
    with pytest.raises(ConfigError, match="got -2 at row 2"):
        encode_labels(np.array(["1", "0", "-2"]), "f")
    with pytest.raises(ConfigError, match="not a classification task"):
        encode_labels(np.array([0, MAX_CLASSES]), "f")
    with pytest.raises(ConfigError, match="empty label at row 1"):
        encode_labels(np.array(["a", " "]), "f")
    ids, k = encode_labels(np.array(["pos", "neg", "pos"]), "f")  # names: sorted order
    assert ids.tolist() == [1, 0, 1] and k == 2


def test_csv_with_a_byte_order_mark_reads_and_a_short_row_is_named(tmp_path: Path) -> None:
    ok = tmp_path / "bom.csv"
    ok.write_bytes(
        b"\xef\xbb\xbftext,label\n" + b"".join(b"r%d,%d\n" % (i, i % 2) for i in range(8))
    )
    assert load_dataset(f"csv:{ok}").num_classes == 2
    short = tmp_path / "short.csv"
    short.write_text("text,label\nfine,1\nno label here\n")
    with pytest.raises(ConfigError, match=r"short.csv: line 3 has no label column"):
        load_dataset(f"csv:{short}")


def test_npy_and_mismatched_test_features_are_named(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.zeros((3, 2)))
    (tmp_path / "one.npz").write_bytes((tmp_path / "one.npy").read_bytes())
    with pytest.raises(ConfigError, match=r"one\.npz: a single \.npy array, not an npz"):
        load_dataset(f"npz:{tmp_path / 'one.npz'}")
    x = np.zeros((4, 3))
    np.savez(tmp_path / "t.npz", x=x, y=[0, 1, 0, 1], x_test=np.zeros((2, 5)), y_test=[0, 1])
    with pytest.raises(ConfigError, match=r"t.npz: x_test rows have shape \(5,\), x rows \(3,\)"):
        load_dataset(f"npz:{tmp_path / 't.npz'}")
