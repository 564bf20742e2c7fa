"""Laplace noise calibration of Ardic & Genc (docs/algorithms.md §2.3), reproduced faithfully.

The paper's client trains ``E`` local epochs with learning rate ``eta``, clipping every
*mini-batch* gradient to L1 norm ``C``; it estimates a smoothness constant ``lambda`` of the loss
from consecutive epochs, derives a sensitivity ``s`` of the trained model to one example, and adds
``Lap(0, b)`` to every entry of the model with ``b = s * T_L / epsilon``.

Where the argument is heuristic (read before quoting an epsilon from it):

1. **Batch-level, not per-example, clipping.** Clipping the mean mini-batch gradient bounds the
   whole batch's contribution, not one example's; one example's influence is bounded only through
   the ``1/|D|`` factors below, which assume full-batch gradient descent.
2. **lambda is estimated empirically** (:class:`SmoothnessEstimator`), from the very data being
   protected, as a max over observed pairs of steps; it is neither a proven bound on the loss's
   smoothness nor privatized itself, so the sensitivity can be underestimated.
3. **Weights, not deltas, are noised** in the original code; every entry of the state dict gets
   noise (buffers included). fedq noises the update it sends (equivalent by post-processing
   against the public global model).
4. **Composition over rounds** multiplies the scale by ``T_L = (T/E) * (K/N)``: basic sequential
   composition over a client's *expected* number of participations, with an unusual division by
   ``E``; it neither uses the realized number of participations nor amplification by sampling.
   Use :class:`fedq.privacy.PureEpsilonLedger` to charge the realized releases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from fedq.errors import ConfigError

#: |lambda| below this takes the lambda ~ 0 branch (the lambda > 0 branch's limit, 2*eta*C*E/|D|).
LAMBDA_ZERO_TOL = 1e-8


def _check(name: str, value: float, *, allow_zero: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(
            f"{name}: must be finite and {'>=' if allow_zero else '>'} 0, got {value!r}"
        )
    return v


def laplace_sensitivity(
    clip_l1: float,
    lr: float,
    local_epochs: int,
    dataset_size: int,
    smoothness_lambda: float,
    *,
    zero_tol: float = LAMBDA_ZERO_TOL,
) -> float:
    """L1 sensitivity ``s`` of the locally trained model (docs/algorithms.md §2.3; heuristic, see
    module).

    With ``C = clip_l1``, ``eta = lr``, ``E = local_epochs``, ``|D| = dataset_size``, ``lambda =
    smoothness_lambda``:

    - ``lambda > 0``: ``E0 = ln(1 + |D|) / ln(1 + lambda*eta)``;
      if ``E < E0``: ``s = 2C / (lambda*|D|) * ((1 + lambda*eta)^E - 1)``,
      else ``s = 2C + 2*eta*C*(E - E0)``;
    - ``lambda ~ 0`` (``|lambda| < zero_tol``): ``s = 2*eta*C*E / |D|``.

    The first branch tends to the last as ``lambda -> 0``. At ``E = E0`` the two ``lambda > 0``
    sub-cases give ``2C/lambda`` and ``2C``, which agree only for ``lambda = 1``: the formula is
    reproduced as published, jump included.
    """
    c = _check("clip_l1", clip_l1)
    eta = _check("lr", lr)
    e = _check("local_epochs", local_epochs)
    n = _check("dataset_size", dataset_size)
    lam = float(smoothness_lambda)
    if not math.isfinite(lam) or lam < -zero_tol:
        raise ConfigError(f"smoothness_lambda: must be finite and >= 0, got {smoothness_lambda!r}")
    if lam < zero_tol:
        return 2.0 * eta * c * e / n
    growth = math.log1p(lam * eta)
    e0 = math.log1p(n) / growth
    if e < e0:
        return 2.0 * c / (lam * n) * math.expm1(e * growth)
    return 2.0 * c + 2.0 * eta * c * (e - e0)


def laplace_scale(
    sensitivity: float,
    epsilon: float,
    rounds: int,
    local_epochs: int,
    clients_per_round: int,
    num_clients: int,
) -> float:
    """Laplace scale ``b = s * T_L / epsilon`` with ``T_L = (T / E) * (K / N)`` (docs/algorithms.md
    §2.3).

    ``T = rounds``, ``E = local_epochs``, ``K = clients_per_round``, ``N = num_clients``. Each
    release is then ``(epsilon / T_L)``-DP for sensitivity ``s``; ``T_L`` releases compose to
    ``epsilon``.
    """
    s = _check("sensitivity", sensitivity)
    eps = _check("epsilon", epsilon)
    t = _check("rounds", rounds)
    e = _check("local_epochs", local_epochs)
    k = _check("clients_per_round", clients_per_round)
    n = _check("num_clients", num_clients)
    if k > n:
        raise ConfigError(
            f"clients_per_round: {clients_per_round} exceeds num_clients={num_clients}"
        )
    return s * (t / e) * (k / n) / eps


def _flat(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> torch.Tensor:
    ts = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in ts])


class SmoothnessEstimator:
    """Empirical smoothness ``lambda = max ||g_t - g_{t-1}||_1 / ||w_t - w_{t-1}||_1``.

    As in the original code, the weights and gradient of every step are stored under the step's
    batch index; when the same batch index comes round again (the next epoch), the pair (this
    epoch, previous epoch) gives one ratio and the stored entry is replaced. Memory is two flat
    float32 copies of the trainable parameters per batch index. With one local epoch no pair
    exists and :attr:`value` stays 0 (the ``lambda ~ 0`` branch). Heuristic: see module docstring.
    """

    def __init__(self) -> None:
        self._last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.value = 0.0
        self.pairs = 0

    def record(
        self,
        batch_index: int,
        weights: Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
        grads: Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
    ) -> float:
        """Store this step's (weights, grads) for ``batch_index``; returns the running lambda."""
        w, g = _flat(weights), _flat(grads)
        prev = self._last.get(batch_index)
        if prev is not None:
            if prev[0].shape != w.shape or prev[1].shape != g.shape:
                raise ConfigError(f"batch {batch_index}: parameter shapes changed between epochs")
            dw = float((w - prev[0]).abs().sum())
            if dw > 0:
                self.value = max(self.value, float((g - prev[1]).abs().sum()) / dw)
                self.pairs += 1
        self._last[batch_index] = (w, g)
        return self.value

    def reset(self) -> None:
        self._last.clear()
        self.value = 0.0
        self.pairs = 0
