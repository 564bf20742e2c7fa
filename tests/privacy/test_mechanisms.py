"""Clipping bounds, Gaussian / Laplace noise scales, reproducibility of the noise."""

from __future__ import annotations

import math

import pytest
import torch

from fedq.errors import ConfigError
from fedq.privacy import GaussianMechanism, LaplaceMechanism, clip_l1, clip_l2, global_norm

N = 400_000  # noise samples per scale check
# Tolerances are 6 standard errors of each estimator at N samples, so a correct sampler fails with
# probability ~1e-9 while a scale off by a few percent fails for sure.
SIGMAS = 6.0


def _update(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 200, generator=g) * scale,
        "b": torch.randn(200, generator=g) * scale,
        "h": torch.randn(7, 3, 5, generator=g) * scale,
    }


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()]).double()


@pytest.mark.parametrize(("clip", "p"), [(clip_l2, 2), (clip_l1, 1)])
def test_clipping_bounds_norm_and_keeps_direction(clip, p) -> None:  # type: ignore[no-untyped-def]
    u = _update()
    norm = global_norm(u, p)
    for c in (norm / 3, norm / 1000, 1e-3):
        out, orig = clip(u, c)
        assert orig == pytest.approx(norm)
        assert global_norm(out, p) <= c
        assert global_norm(out, p) == pytest.approx(c, rel=1e-5)
        cos = torch.nn.functional.cosine_similarity(_flat(out), _flat(u), dim=0)
        assert float(cos) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("clip", "p"), [(clip_l2, 2), (clip_l1, 1)])
def test_clipping_leaves_small_updates_unchanged(clip, p) -> None:  # type: ignore[no-untyped-def]
    u = _update()
    norm = global_norm(u, p)
    for c in (norm, norm * 2):
        out, _ = clip(u, c)
        assert all(torch.equal(out[k], u[k]) for k in u)
        assert all(out[k] is not u[k] for k in u)  # copies, not aliases


def test_clipping_rejects_bad_bounds_and_nan() -> None:
    with pytest.raises(ConfigError, match="max_norm"):
        clip_l2(_update(), 0.0)
    with pytest.raises(ConfigError, match="NaN"):
        clip_l1({"x": torch.tensor([1.0, float("nan")])}, 1.0)


def test_laplace_noise_has_configured_scale() -> None:
    b = 0.7
    noise = LaplaceMechanism(b).noise({"x": torch.empty(N)}, torch.Generator().manual_seed(3))["x"]
    x = noise.double()
    # |X| ~ Exp(b): mean b, sd b.  Var(X) = 2 b^2; sd of the sample variance = sqrt(20/N) b^2.
    assert float(x.abs().mean()) == pytest.approx(b, abs=SIGMAS * b / math.sqrt(N))
    assert float(x.var()) == pytest.approx(2 * b * b, abs=SIGMAS * math.sqrt(20 / N) * b * b)
    assert abs(float(x.mean())) < SIGMAS * math.sqrt(2) * b / math.sqrt(N)
    # Laplace, not Gaussian: kurtosis 6 (Gaussian 3). sd of the sample kurtosis is < 0.1 here.
    kurt = float(((x - x.mean()) ** 4).mean() / x.var() ** 2)
    assert kurt == pytest.approx(6.0, abs=0.5)


def test_laplace_privatize_adds_noise_and_clips_when_asked() -> None:
    u = _update(scale=3.0)
    g = torch.Generator().manual_seed(0)
    out = LaplaceMechanism(0.5).privatize(u, g)
    diff = _flat(out) - _flat(u)
    n = diff.numel()
    assert float(diff.abs().mean()) == pytest.approx(0.5, abs=SIGMAS * 0.5 / math.sqrt(n))
    mech = LaplaceMechanism(0.5, clip_norm=10.0)
    assert mech.epsilon_per_release == pytest.approx(40.0)
    out = mech.privatize(u, torch.Generator().manual_seed(0))
    clipped, _ = clip_l1(u, 10.0)
    diff = _flat(out) - _flat(clipped)
    assert float(diff.abs().mean()) == pytest.approx(0.5, abs=SIGMAS * 0.5 / math.sqrt(n))


def test_gaussian_privatize_is_clip_plus_noise_of_std_z_c() -> None:
    u = _update(scale=2.0)
    mech = GaussianMechanism(clip_norm=5.0, noise_multiplier=0.3)
    out = mech.privatize(u, torch.Generator().manual_seed(1))
    assert set(out) == set(u) and all(out[k].shape == u[k].shape for k in u)
    clipped, _ = clip_l2(u, 5.0)
    diff = _flat(out) - _flat(clipped)
    n, std = diff.numel(), 1.5
    # sd of the sample sd of a Gaussian is std / sqrt(2n)
    assert float(diff.std()) == pytest.approx(std, abs=SIGMAS * std / math.sqrt(2 * n))
    assert abs(float(diff.mean())) < SIGMAS * std / math.sqrt(n)


def test_gaussian_central_noise_divides_by_divisor() -> None:
    mech = GaussianMechanism(clip_norm=2.0, noise_multiplier=1.5)
    like = {"a": torch.empty(N // 2), "b": torch.empty(N // 2)}
    noise = mech.noise(like, torch.Generator().manual_seed(0), scale_divisor=10)
    x = _flat(noise)
    std = 1.5 * 2.0 / 10
    assert float(x.std()) == pytest.approx(std, abs=SIGMAS * std / math.sqrt(2 * N))


@pytest.mark.parametrize(
    "mech", [GaussianMechanism(1.0, 1.0), LaplaceMechanism(1.0)], ids=["gauss", "laplace"]
)
def test_same_seed_same_noise_other_seed_other_noise(mech) -> None:  # type: ignore[no-untyped-def]
    u = _update()
    a = mech.privatize(u, torch.Generator().manual_seed(42))
    b = mech.privatize(u, torch.Generator().manual_seed(42))
    c = mech.privatize(u, torch.Generator().manual_seed(43))
    assert all(torch.equal(a[k], b[k]) for k in u)
    assert not torch.equal(a["w"], c["w"])


def test_noise_keeps_dtype() -> None:
    u = {"x": torch.zeros(1000, dtype=torch.float16)}
    out = GaussianMechanism(1.0, 1.0).privatize(u, torch.Generator().manual_seed(0))
    assert out["x"].dtype == torch.float16 and float(out["x"].float().std()) > 0.5


def test_mechanisms_reject_invalid_parameters() -> None:
    with pytest.raises(ConfigError, match="noise_multiplier"):
        GaussianMechanism(1.0, 0.0)
    with pytest.raises(ConfigError, match="scale"):
        LaplaceMechanism(-1.0)


def test_insecure_rng_warning_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    from fedq.privacy import mechanisms

    mechanisms._warned_insecure = False
    with caplog.at_level("WARNING", logger="fedq.privacy.mechanisms"):
        for _ in range(3):
            GaussianMechanism(1.0, 1.0).privatize(_update(), torch.Generator().manual_seed(0))
            LaplaceMechanism(1.0).noise(_update(), torch.Generator().manual_seed(0))
    hits = [r for r in caplog.records if "not cryptographically secure" in r.getMessage()]
    assert len(hits) == 1
