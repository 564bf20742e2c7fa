"""Differential privacy: noise mechanisms, Opacus DP-SGD on clients, accounting, budget stop.

- :mod:`~fedq.privacy.mechanisms`: L1/L2 clipping, :class:`GaussianMechanism` (local or central DP),
  :class:`LaplaceMechanism` and the Laplace calibration of Ardic & Genc
  (:func:`laplace_sensitivity`, :func:`laplace_scale`, :class:`SmoothnessEstimator`).
- :mod:`~fedq.privacy.accounting`: :class:`GaussianAccountant` (Opacus RDP / PRV),
  :class:`PureEpsilonLedger` (Laplace), :class:`BudgetGuard`, :func:`plan_noise_multiplier`.
- :mod:`~fedq.privacy.local_dp`: :func:`make_private` (Opacus ``PrivacyEngine``) and
  :func:`dp_local_train` for a fedq ``ModelBundle``.

Importing this package does not import opacus; the functions that need it import it when called.
"""

from fedq.privacy.accounting import (
    ACCOUNTANT_KINDS,
    AccountantKind,
    BudgetGuard,
    GaussianAccountant,
    PrivacyStateError,
    PureEpsilonLedger,
    expected_epsilon,
    plan_noise_multiplier,
)
from fedq.privacy.laplace import SmoothnessEstimator, laplace_scale, laplace_sensitivity
from fedq.privacy.local_dp import (
    GRAD_SAMPLE_MODES,
    DPTrainResult,
    PrivateTraining,
    check_dp_compatible,
    dp_local_train,
    make_private,
)
from fedq.privacy.mechanisms import (
    GaussianMechanism,
    LaplaceMechanism,
    clip_l1,
    clip_l2,
    global_norm,
    warn_insecure_rng,
)

__all__ = [
    "ACCOUNTANT_KINDS",
    "GRAD_SAMPLE_MODES",
    "AccountantKind",
    "BudgetGuard",
    "DPTrainResult",
    "GaussianAccountant",
    "GaussianMechanism",
    "LaplaceMechanism",
    "PrivacyStateError",
    "PrivateTraining",
    "PureEpsilonLedger",
    "SmoothnessEstimator",
    "check_dp_compatible",
    "clip_l1",
    "clip_l2",
    "dp_local_train",
    "expected_epsilon",
    "global_norm",
    "laplace_scale",
    "laplace_sensitivity",
    "make_private",
    "plan_noise_multiplier",
    "warn_insecure_rng",
]
