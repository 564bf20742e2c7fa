"""mlp / cnn bundles: shapes, exact state round trips, seeding, registry errors, and they learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedq.data import ArrayDataset, DataSplit, load_dataset
from fedq.errors import ConfigError
from fedq.models import ModelBundle, StateMismatchError, build_model, model_names


@pytest.fixture(scope="module")
def digits() -> DataSplit:
    return load_dataset("digits")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_forward_shapes_on_digits(name: str, digits: DataSplit) -> None:
    b = build_model(name, num_classes=10, input_dim=64, seed=0)
    x, y = b.make_batch(digits.train, torch.arange(17))
    assert x.shape == (17, 64) and y.shape == (17,)
    assert b(x).shape == (17, 10)


def test_cnn_picks_2d_for_square_and_1d_otherwise() -> None:
    two_d = build_model("cnn", num_classes=10, input_dim=64, seed=0)
    one_d = build_model("cnn", num_classes=10, input_dim=40, seed=0)  # mnist1d rows
    assert any(isinstance(m, nn.Conv2d) for m in two_d.module.modules())
    assert any(isinstance(m, nn.Conv1d) for m in one_d.module.modules())
    assert one_d(torch.randn(3, 40)).shape == (3, 10)
    forced = build_model("cnn", num_classes=4, input_dim=64, seed=0, input_shape=(1, 64))
    assert any(isinstance(m, nn.Conv1d) for m in forced.module.modules())
    with pytest.raises(ConfigError, match="input_shape"):
        build_model("cnn", num_classes=4, input_dim=64, seed=0, input_shape=(2, 5, 5))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_state_round_trip_restores_outputs_exactly(name: str, digits: DataSplit) -> None:
    b = build_model(name, num_classes=10, input_dim=64, seed=0).eval()
    x, y = b.make_batch(digits.train, torch.arange(64))
    state = b.trainable_state()
    before = b(x).detach()
    opt = torch.optim.SGD(list(b.trainable_parameters()), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        opt.step()
    assert not torch.equal(b(x).detach(), before)
    assert not all(torch.equal(state[k], v) for k, v in b.trainable_state().items())  # copies
    b.load_trainable_state(state)
    assert torch.equal(b(x).detach(), before)


def test_state_is_every_parameter_and_mismatches_are_refused() -> None:
    b = build_model("mlp", num_classes=3, input_dim=5, seed=0, hidden=7)
    state = b.trainable_state()
    assert set(state) == {n for n, _ in b.module.named_parameters()}
    assert sum(v.numel() for v in state.values()) == 5 * 7 + 7 + 7 * 3 + 3
    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises(StateMismatchError, match="missing"):
        b.load_trainable_state(missing)
    bad = {k: v.clone() for k, v in state.items()}
    k0 = next(iter(bad))
    bad[k0] = torch.zeros(1)
    with pytest.raises(StateMismatchError, match="shape"):
        b.load_trainable_state(bad)
    with pytest.raises(StateMismatchError, match="unexpected"):
        b.load_trainable_state({**state, "extra": torch.zeros(1)})


def test_seed_fixes_init_without_touching_global_rng() -> None:
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    a = build_model("mlp", num_classes=3, input_dim=5, seed=1).trainable_state()
    assert torch.equal(torch.rand(1), expected)
    b = build_model("mlp", num_classes=3, input_dim=5, seed=1).trainable_state()
    c = build_model("mlp", num_classes=3, input_dim=5, seed=2).trainable_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_registry_errors() -> None:
    assert {"mlp", "cnn", "minilm_lora", "tiny_bert_lora"} <= set(model_names())
    with pytest.raises(ConfigError, match=r"registered: .*mlp"):
        build_model("resnet", num_classes=2, seed=0)
    with pytest.raises(ConfigError, match="unknown option 'hiden'"):
        build_model("mlp", num_classes=2, input_dim=4, seed=0, hiden=3)
    with pytest.raises(ConfigError, match="input_dim"):
        build_model("mlp", num_classes=2, seed=0)


def test_shared_scenario_options_are_accepted_by_every_model() -> None:
    """The runtime passes the whole model section (hidden, lora_r, max_length) to any builder."""
    b = build_model("mlp", num_classes=2, input_dim=4, seed=0, hidden=5, lora_r=8, max_length=64)
    assert b.num_parameters() == 4 * 5 + 5 + 5 * 2 + 2
    c = build_model("cnn", num_classes=2, input_dim=64, seed=0, hidden=5, lora_r=8, max_length=9)
    assert c(torch.zeros(1, 64)).shape == (1, 2)


def test_collate_matches_make_batch(digits: DataSplit) -> None:
    b = build_model("mlp", num_classes=10, input_dim=64, seed=0)
    idx = torch.tensor([3, 1, 4])
    xs, ys = b.collate([digits.train[int(i)] for i in idx])
    xm, ym = b.make_batch(digits.train, idx)
    assert isinstance(xs, torch.Tensor) and torch.equal(xs, xm) and torch.equal(ys, ym)


def test_text_data_is_refused_by_array_models() -> None:
    text = load_dataset("rotten_tomatoes", max_train=4, max_test=4).train
    with pytest.raises(ConfigError, match="text"):
        build_model("mlp", num_classes=2, input_dim=4, seed=0).make_batch(text, torch.arange(2))


def test_mlp_learns_digits(digits: DataSplit) -> None:
    """A short full-batch run must classify held-out digits well, or the bundle is miswired."""
    b: ModelBundle = build_model("mlp", num_classes=10, input_dim=64, seed=0)
    train: ArrayDataset = digits.train  # type: ignore[assignment]
    x, y = b.make_batch(train, torch.arange(len(train)))
    opt = torch.optim.Adam(list(b.trainable_parameters()), lr=0.01)
    b.train()
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        opt.step()
    xt, yt = b.make_batch(digits.test, torch.arange(len(digits.test)))
    acc = (b.eval()(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.9
