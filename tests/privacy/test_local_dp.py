"""Opacus DP-SGD wrapping: noise and clipping happen, fedq models work, bad layers are named."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedq.data import load_dataset
from fedq.errors import ConfigError, UnsupportedError
from fedq.models import build_model
from fedq.privacy import GaussianAccountant, check_dp_compatible, dp_local_train, make_private
from fedq.privacy.local_dp import _noise_only_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))


def _loader(n: int = 64, batch: int = 16) -> DataLoader:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 20, generator=g) * 5, torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, generator=g)


def _params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in m.parameters()])


def test_make_private_noise_std_matches_z_c_over_batch() -> None:
    """One SGD step at lr 1 with a huge noise multiplier moves each weight by ~N(0, (zC/B)^2)."""
    model, z, c, batch = _mlp(), 200.0, 1.0, 16
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    priv = make_private(
        model,
        opt,
        _loader(batch=batch),
        noise_multiplier=z,
        max_grad_norm=c,
        noise_generator=torch.Generator().manual_seed(0),
    )
    assert priv.criterion is None and priv.sample_rate == pytest.approx(0.25)
    before = _params(model)
    x, y = next(iter(priv.data_loader))
    nn.functional.cross_entropy(priv.module(x), y).backward()
    priv.optimizer.step()
    step = _params(model) - before
    n, std = step.numel(), z * c / batch  # expected batch = 64 * 0.25
    # the clipped gradient moves a weight by at most C/B = std/z: negligible next to the noise
    assert float(step.std()) == pytest.approx(std, rel=6 / math.sqrt(2 * n) + 2 / z)
    assert len(priv.engine.accountant) == 1  # the engine's accountant saw the step
    priv.close()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_make_private_clips_per_example_gradients(mode: str) -> None:
    """With negligible noise and a fixed batch, the step norm is <= lr * C (mean of clipped)."""
    model, c, loader = _mlp(), 0.01, _loader(batch=16)
    x, y = next(iter(loader))
    raw = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    assert math.sqrt(sum(float(g.square().sum()) for g in raw)) > 10 * c  # clipping matters
    priv = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        loader,
        noise_multiplier=1e-9,
        max_grad_norm=c,
        poisson_sampling=False,
        grad_sample_mode=mode,  # type: ignore[arg-type]
    )
    before = _params(model)
    logits = priv.module(x)
    loss = priv.criterion(logits, y) if priv.criterion else nn.functional.cross_entropy(logits, y)
    loss.backward()
    priv.optimizer.step()
    norm = float((_params(model) - before).norm())
    assert 0.1 * c < norm <= c * (1 + 1e-5)
    priv.close()


def test_empty_poisson_batch_still_releases_noise_and_is_accounted() -> None:
    model = _mlp()
    priv = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        _loader(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(0),
    )
    before = _params(model)
    _noise_only_step(priv)
    assert not torch.equal(_params(model), before)
    assert len(priv.engine.accountant) == 1
    priv.close()


def test_ghost_mode_returns_a_wrapped_criterion_and_steps() -> None:
    model = _mlp()
    priv = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        _loader(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
    )
    assert priv.criterion is not None
    before = _params(model)
    x, y = next(iter(priv.data_loader))
    priv.optimizer.zero_grad()
    priv.criterion(priv.module(x), y).backward()
    priv.optimizer.step()
    assert not torch.equal(_params(model), before)
    priv.close()


def test_mlp_bundle_dp_round_is_reproducible_and_accountable() -> None:
    data = load_dataset("digits").train
    idx = torch.arange(100)

    def run(seed: int) -> tuple[torch.Tensor, object]:
        b = build_model("mlp", num_classes=10, input_dim=64, seed=0)
        start = _params(b.module)
        r = dp_local_train(
            b,
            data,
            idx,
            batch_size=25,
            epochs=2,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(seed),
            lr=0.5,
        )
        after = _params(b.module)
        assert not torch.equal(after, start)
        return after, r

    a, ra = run(1)
    b, _ = run(1)
    c, _ = run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ra.steps == 8 and ra.sample_rate == pytest.approx(0.25)  # type: ignore[attr-defined]
    assert math.isfinite(ra.loss)  # type: ignore[attr-defined]
    acc = GaussianAccountant("rdp", 1e-5)
    acc.step(ra.noise_multiplier, ra.sample_rate, ra.steps)  # type: ignore[attr-defined]
    assert acc.epsilon() > 0


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_tiny_bert_lora_dp_round_trains_and_unhooks(mode: str) -> None:
    data = load_dataset("rotten_tomatoes").train
    b = build_model("tiny_bert_lora", num_classes=2, seed=0)
    before = b.trainable_state()
    r = dp_local_train(
        b,
        data,
        torch.arange(40),
        batch_size=8,
        epochs=1,
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(0),
        grad_sample_mode=mode,  # type: ignore[arg-type]
    )
    after = b.trainable_state()
    assert r.steps == 5 and r.sample_rate == pytest.approx(0.2)
    assert all(not torch.equal(after[k], before[k]) for k in before)  # adapters and head move
    frozen = [p for p in b.module.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    # Opacus hooks and per-sample state are gone: the bundle is a plain model again
    assert not any(hasattr(p, "grad_sample") for p in b.module.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in b.module.modules())


def test_lora_on_embeddings_is_refused_naming_the_layer() -> None:
    from peft import LoraConfig, get_peft_model

    from fedq.models import encoders

    enc = encoders.tiny_encoder(100, hidden=16, layers=1, heads=2)
    cfg = LoraConfig(r=2, target_modules=["query", "value", "word_embeddings"])
    model = get_peft_model(enc, cfg)
    with pytest.raises(UnsupportedError, match="word_embeddings") as err:
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    assert "target_modules" in str(err.value)
    assert str(err.value).count("  - layer ") == 1  # LoRA on query/value is fine


def test_trainable_embedding_is_refused_unless_allowed() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedError, match=r"layer '0' is a trainable nn.Embedding"):
        check_dp_compatible(model)
    check_dp_compatible(model, allow_trainable_embeddings=True)
    model[0].weight.requires_grad_(False)
    check_dp_compatible(model)


def test_opacus_validator_problems_are_reported() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedError, match=r"BatchNorm(.|\n)*flagged by .*: 1 \(BatchNorm1d\)"):
        check_dp_compatible(model.train())


def test_make_private_rejects_disabled_noise_and_unknown_mode() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="noise_multiplier > 0"):
        make_private(model, opt, _loader(), noise_multiplier=0.0, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="allowed: hooks, ghost"):
        make_private(
            model,
            opt,
            _loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="functorch",  # type: ignore[arg-type]
        )


def test_make_private_puts_module_in_train_mode() -> None:
    model = _mlp().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        priv = make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    assert model.training
    priv.close()
