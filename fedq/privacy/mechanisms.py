"""Noise mechanisms on tensor dicts (pure torch): norm clipping, Gaussian and Laplace noise.

Every random draw takes an explicit ``torch.Generator`` so a (seed, client, round) triple gives the
same noise on any worker. That makes runs reproducible, but torch's PRNG (Mersenne Twister / Philox)
is **not** cryptographically secure: an attacker who learns the generator state can subtract the
noise. Like Opacus with ``secure_mode=False`` we log a one-time warning; use a CSPRNG-seeded
process (and keep seeds secret) before claiming DP in production.

Guarantees, stated for one release:

- :class:`GaussianMechanism`: the update is clipped to L2 norm ``C`` and each coordinate gets
  ``N(0, (z*C)^2)``. With add/remove-one neighbours of the clipped quantity (sensitivity ``C``) this
  is the Gaussian mechanism with noise multiplier ``z`` (Dwork & Roth 2014, Thm A.1; tight
  accounting with RDP/PRV, Mironov 2017, arXiv:1702.07476; Gopi et al. 2021, arXiv:2106.02848), so
  compose it with :class:`fedq.privacy.GaussianAccountant`.
- :class:`LaplaceMechanism`: ``Lap(0, b)`` per coordinate. A quantity with L1 sensitivity ``s``
  released this way is ``(s/b, 0)``-DP (Dwork et al. 2006). The Laplace scale used by
  Ardic & Genc ("communication-efficient DP federated learning with quantization",
  docs/algorithms.md §2.3) comes from the heuristic sensitivity in
  :mod:`fedq.privacy.laplace`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from fedq.errors import ConfigError
from fedq.privacy.laplace import SmoothnessEstimator, laplace_scale, laplace_sensitivity

log = logging.getLogger(__name__)

__all__ = [
    "GaussianMechanism",
    "LaplaceMechanism",
    "SmoothnessEstimator",
    "clip_l1",
    "clip_l2",
    "global_norm",
    "laplace_scale",
    "laplace_sensitivity",
    "warn_insecure_rng",
]

Tensors = Mapping[str, torch.Tensor]

#: Clipping scales by ``C / norm * (1 - CLIP_MARGIN)``: float32 rounding of the scaled entries is
#: ~6e-8 relative, so the clipped norm is <= C exactly, as the sensitivity argument assumes.
CLIP_MARGIN = 1e-6

_warned_insecure = False


def warn_insecure_rng() -> None:
    """Log once per process that the noise comes from torch's non-cryptographic PRNG.

    Same caveat as Opacus's ``secure_mode=False`` warning (Opacus ``PrivacyEngine``): fine for
    experiments; a deployment needs a CSPRNG (Opacus uses ``torchcsprng``) and secret seeds.
    """
    global _warned_insecure
    if not _warned_insecure:
        _warned_insecure = True
        log.warning(
            "DP noise is drawn from torch's pseudo-random generator, which is not "
            "cryptographically secure (as Opacus secure_mode=False): fine for experiments, "
            "not for a production privacy guarantee"
        )


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    v = float(value)
    ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}: must be finite and {bound}, got {value!r}")
    return v


def global_norm(tensors: Tensors, p: float) -> float:
    """The Lp norm (p = 1 or 2) of all tensors taken together as one flat vector (float64 sums)."""
    if p == 1:
        return float(sum(t.detach().double().abs().sum() for t in tensors.values()))
    return math.sqrt(float(sum(t.detach().double().square().sum() for t in tensors.values())))


def _clip(tensors: Tensors, max_norm: float, p: float) -> tuple[dict[str, torch.Tensor], float]:
    c = _positive("max_norm", max_norm)
    norm = global_norm(tensors, p)
    if not math.isfinite(norm):
        raise ConfigError(f"cannot clip: the update's L{p:g} norm is {norm} (NaN/Inf entries)")
    if norm <= c:
        return {k: t.clone() for k, t in tensors.items()}, norm
    factor = c / norm * (1.0 - CLIP_MARGIN)
    return {k: t * factor for k, t in tensors.items()}, norm


def clip_l2(tensors: Tensors, max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale all tensors together so their global L2 norm is <= ``max_norm``.

    Returns ``(clipped copies, original norm)``; tensors already within the bound come back as
    unchanged copies.
    """
    return _clip(tensors, max_norm, 2)


def clip_l1(tensors: Tensors, max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Like :func:`clip_l2` with the global L1 norm (the norm the Laplace mechanism needs)."""
    return _clip(tensors, max_norm, 1)


def _draw_like(
    t: torch.Tensor, generator: torch.Generator, draw: str, scale: float
) -> torch.Tensor:
    """Noise shaped like ``t`` (float32 on the generator's device, then moved and cast)."""
    dev = generator.device
    if draw == "gauss":
        z = torch.randn(t.shape, generator=generator, device=dev, dtype=torch.float32)
    else:  # Laplace(0, 1) = Exp(1) - Exp(1); exponential_ never returns inf
        e1 = torch.empty(t.shape, device=dev, dtype=torch.float32).exponential_(
            1.0, generator=generator
        )
        e2 = torch.empty(t.shape, device=dev, dtype=torch.float32).exponential_(
            1.0, generator=generator
        )
        z = e1 - e2
    return (z * scale).to(device=t.device)


def _add_noise(
    tensors: Tensors, generator: torch.Generator, draw: str, scale: float
) -> dict[str, torch.Tensor]:
    warn_insecure_rng()
    out = {}
    for k, t in tensors.items():
        noisy = t.float() + _draw_like(t, generator, draw, scale)
        out[k] = noisy.to(t.dtype) if t.is_floating_point() else noisy
    return out


class GaussianMechanism:
    """Clip to L2 norm ``clip_norm``, add ``N(0, (noise_multiplier * clip_norm)^2)`` per coordinate.

    One :meth:`privatize` call on one party's update is a Gaussian mechanism with L2 sensitivity
    ``clip_norm`` (add/remove neighbours) and noise multiplier ``z``; account for it with
    :class:`~fedq.privacy.GaussianAccountant` (``sample_rate`` = the probability that this party's
    data enters the release). For central DP the server clips each client update, sums, and adds
    :meth:`noise` once to the aggregate (McMahan et al. 2018, "Learning differentially private
    recurrent language models", arXiv:1710.06963, DP-FedAvg).
    """

    def __init__(self, clip_norm: float, noise_multiplier: float) -> None:
        self.clip_norm = _positive("clip_norm", clip_norm)
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier)

    @property
    def std(self) -> float:
        """Per-coordinate noise standard deviation, ``noise_multiplier * clip_norm``."""
        return self.noise_multiplier * self.clip_norm

    def clip(self, update: Tensors) -> tuple[dict[str, torch.Tensor], float]:
        """:func:`clip_l2` at this mechanism's bound (server side of central DP)."""
        return clip_l2(update, self.clip_norm)

    def privatize(self, update: Tensors, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Clipped and noised copy of ``update`` (local DP of one release)."""
        clipped, _ = clip_l2(update, self.clip_norm)
        return _add_noise(clipped, generator, "gauss", self.std)

    def noise(
        self, shape_like: Tensors, generator: torch.Generator, scale_divisor: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Pure noise with std ``noise_multiplier * clip_norm / scale_divisor``, shaped like
        ``shape_like`` (float32; the caller adds it).

        Central DP: add to the *sum* of clipped updates with ``scale_divisor=1``, or to their mean
        over ``K`` clients with ``scale_divisor=K`` (same guarantee: sensitivity of the mean is
        ``clip_norm / K``).
        """
        d = _positive("scale_divisor", scale_divisor)
        warn_insecure_rng()
        return {
            k: _draw_like(t, generator, "gauss", self.std / d).to(torch.float32)
            for k, t in shape_like.items()
        }

    def __repr__(self) -> str:
        return (
            f"GaussianMechanism(clip_norm={self.clip_norm}, "
            f"noise_multiplier={self.noise_multiplier})"
        )


class LaplaceMechanism:
    """Add ``Lap(0, scale)`` noise to every coordinate (variance ``2 * scale^2``).

    Releasing a quantity of L1 sensitivity ``s`` this way is ``(s / scale, 0)``-DP (Dwork,
    McSherry, Nissim & Smith 2006). With ``clip_norm`` set, :meth:`privatize` first clips the update
    to L1 norm ``clip_norm``; any two clipped updates then differ by at most ``2 * clip_norm`` in
    L1, so one release is :attr:`epsilon_per_release`-DP for the whole client (a rigorous bound).

    Without ``clip_norm`` the guarantee is only as good as the sensitivity the scale was derived
    from: Ardic & Genc (docs/algorithms.md §2.3) clip mini-batch *gradients* (L1) during training
    and take the scale from :func:`fedq.privacy.laplace_sensitivity` and
    :func:`fedq.privacy.laplace_scale`, which are heuristic (see there). In their code the noise
    goes on the model weights themselves; fedq noises the update (delta) it sends, which differs
    from the weights by the public global model, so the two releases are equivalent by
    post-processing.
    """

    def __init__(self, scale: float, *, clip_norm: float | None = None) -> None:
        self.scale = _positive("scale", scale)
        self.clip_norm = None if clip_norm is None else _positive("clip_norm", clip_norm)

    @property
    def epsilon_per_release(self) -> float | None:
        """``2 * clip_norm / scale`` when clipping is on (replace-one L1 sensitivity), else None."""
        return None if self.clip_norm is None else 2.0 * self.clip_norm / self.scale

    def privatize(self, update: Tensors, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Noised copy of ``update`` (L1-clipped first when ``clip_norm`` is set)."""
        src: Tensors = update if self.clip_norm is None else clip_l1(update, self.clip_norm)[0]
        return _add_noise(src, generator, "laplace", self.scale)

    def noise(self, shape_like: Tensors, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Pure ``Lap(0, scale)`` noise shaped like ``shape_like`` (float32)."""
        warn_insecure_rng()
        return {
            k: _draw_like(t, generator, "laplace", self.scale).to(torch.float32)
            for k, t in shape_like.items()
        }

    def __repr__(self) -> str:
        return f"LaplaceMechanism(scale={self.scale}, clip_norm={self.clip_norm})"
