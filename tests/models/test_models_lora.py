"""LoRA text bundles: only adapters + head travel, exact round trips, shared frozen base, learning.

``tiny_bert_lora`` covers the code path fast; ``minilm_lora`` checks the real pretrained encoder.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from fedq.data import ArrayDataset, DataSplit, TextDataset, load_dataset
from fedq.models import LoraTextBundle, StateMismatchError, build_model, encoders


def _is_travelling(name: str) -> bool:
    return "lora_" in name or name.startswith("head.")


def _eval_loss(b: LoraTextBundle, inputs: dict, y: torch.Tensor) -> float:
    with torch.no_grad():
        return nn.functional.cross_entropy(b.eval()(inputs), y).item()


def _train(
    b: LoraTextBundle, inputs: dict, y: torch.Tensor, steps: int, lr: float, adam: bool = False
) -> tuple[float, float]:
    """Eval-mode loss before and after ``steps`` optimizer steps (eval mode: no dropout noise)."""
    params = list(b.trainable_parameters())
    opt = torch.optim.Adam(params, lr=lr) if adam else torch.optim.SGD(params, lr=lr)
    before = _eval_loss(b, inputs, y)
    b.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(b(inputs), y).backward()
        opt.step()
    return before, _eval_loss(b, inputs, y)


@pytest.fixture(scope="module")
def rt() -> DataSplit:
    return load_dataset("rotten_tomatoes", max_train=64, max_test=32, seed=0)


def _tiny(seed: int = 0, **kw: object) -> LoraTextBundle:
    b = build_model("tiny_bert_lora", num_classes=2, seed=seed, **kw)
    assert isinstance(b, LoraTextBundle)
    return b


def test_tiny_state_is_exactly_lora_and_head() -> None:
    b = _tiny()
    state = b.trainable_state()
    assert all(_is_travelling(k) for k in state)
    assert len(state) == 2 * 2 * 2 + 2  # 2 layers x (query, value) x (A, B) + head weight, bias
    assert {k for k in state if k.startswith("head.")} == {"head.weight", "head.bias"}
    trainable = {n for n, p in b.module.named_parameters() if p.requires_grad}
    assert len(trainable) == len(state)  # what trains is what travels
    assert sum(v.numel() for v in state.values()) < 0.01 * b.num_parameters()


def test_tiny_round_trip_and_transfer_between_bundles(rt: DataSplit) -> None:
    a, other = _tiny(seed=0), _tiny(seed=1)
    x, y = a.make_batch(rt.train, torch.arange(16))
    state = a.trainable_state()
    before = a.eval()(x).detach()
    _train(a, x, y, steps=3, lr=1.0)
    assert not torch.allclose(a.eval()(x).detach(), before)
    a.load_trainable_state(state)
    assert torch.equal(a.eval()(x).detach(), before)
    # another client's bundle (other seed) becomes the same model: the frozen base is shared
    assert not torch.allclose(other.eval()(x).detach(), before)
    other.load_trainable_state(state)
    assert torch.equal(other.eval()(x).detach(), before)


def test_tiny_training_touches_only_adapters_and_head(rt: DataSplit) -> None:
    b = _tiny()
    frozen = {n: p.detach().clone() for n, p in b.module.named_parameters() if not p.requires_grad}
    x, y = b.make_batch(rt.train, torch.arange(32))
    before, after = _train(b, x, y, steps=20, lr=1e-2, adam=True)
    assert after < before - 0.05, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in b.module.named_parameters() if n in frozen)


def test_tiny_mismatched_state_is_refused() -> None:
    b = _tiny()
    state = b.trainable_state()
    with pytest.raises(StateMismatchError, match=r"missing 'head\.bias'"):
        b.load_trainable_state({k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(StateMismatchError, match="shape"):
        b.load_trainable_state({**state, "head.weight": torch.zeros(3, 32)})
    r4 = _tiny(lora_r=4).trainable_state()
    with pytest.raises(StateMismatchError):
        b.load_trainable_state(r4)


def test_tiny_takes_shared_options_and_ignores_mlp_width() -> None:
    b = _tiny(hidden=64, lora_r=2, max_length=16)  # a scenario's model section passes all three
    assert b.module.head.in_features == 32  # ``hidden`` is the MLP's width, not BERT's
    assert b.max_length == 16
    assert b.trainable_state()[
        "encoder.base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    ].shape == (2, 32)


def test_tiny_batches_truncate_pad_and_accept_token_ids(rt: DataSplit) -> None:
    b = _tiny(max_length=8)
    x, y = b.make_batch(rt.train, torch.tensor([0, 1, 2]))
    assert isinstance(x, dict) and x["input_ids"].shape == (3, 8) and y.shape == (3,)
    assert x["attention_mask"].sum() <= 24
    short = TextDataset(
        ["good", "a much longer snippet about a film"], torch.tensor([1, 0]), 2, "t"
    )
    xs, _ = b.make_batch(short, torch.arange(2))
    assert isinstance(xs, dict)
    assert xs["attention_mask"][0].sum() < xs["attention_mask"][1].sum()  # padding is masked
    collated, labels = b.collate([short[0], short[1]])
    assert isinstance(collated, dict) and torch.equal(collated["input_ids"], xs["input_ids"])
    assert labels.tolist() == [1, 0]
    ids = ArrayDataset(xs["input_ids"], torch.tensor([1, 0]), 2, "ids")
    xi, _ = b.make_batch(ids, torch.arange(2))
    assert isinstance(xi, dict) and torch.equal(xi["attention_mask"], xs["attention_mask"])
    assert torch.allclose(b.eval()(xi), b(xs), atol=1e-6)


@pytest.fixture(scope="module")
def minilm() -> LoraTextBundle:
    t0 = time.perf_counter()
    b = build_model("minilm_lora", num_classes=2, seed=0, max_length=32)  # halves step cost
    print(f"minilm_lora build: {time.perf_counter() - t0:.2f} s")
    assert isinstance(b, LoraTextBundle)
    return b


def test_minilm_is_the_pretrained_encoder(minilm: LoraTextBundle) -> None:
    """Fresh LoRA (B = 0) leaves the pretrained encoder intact: similar words embed closer."""
    enc = minilm.module.encoder.eval()
    inputs = minilm.tokenize(["cat", "feline", "stock market"])
    with torch.no_grad():
        h = enc(**inputs).last_hidden_state
    m = inputs["attention_mask"].unsqueeze(-1).float()
    e = nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
    assert minilm.num_parameters() > 22_000_000


def test_minilm_ships_only_lora_and_head(minilm: LoraTextBundle) -> None:
    state = minilm.trainable_state()
    assert all(_is_travelling(k) for k in state)
    assert len(state) == 6 * 2 * 2 + 2
    numel = sum(v.numel() for v in state.values())
    assert numel == 6 * 2 * (8 * 384 + 384 * 8) + 384 * 2 + 2
    assert numel < 0.005 * minilm.num_parameters()


def test_minilm_second_build_reuses_cached_base(minilm: LoraTextBundle) -> None:
    # ``minilm`` made the first build in this process (under pytest-xdist, not every worker has)
    hits = encoders._pretrained_base.cache_info().hits
    b = build_model("minilm_lora", num_classes=3, seed=1)
    assert encoders._pretrained_base.cache_info().hits == hits + 1
    assert b.module.head.out_features == 3 and b.max_length == 64  # the default


def test_minilm_sgd_steps_reduce_training_loss(minilm: LoraTextBundle, rt: DataSplit) -> None:
    x, y = minilm.make_batch(rt.train, torch.arange(64))
    t0 = time.perf_counter()
    before, after = _train(minilm, x, y, steps=4, lr=0.5)
    secs = time.perf_counter() - t0
    print(f"minilm_lora: 4 SGD steps on 64 x {x['input_ids'].shape[1]} tokens: {secs:.2f} s")
    assert after < before - 0.03, (before, after)
