"""Pure maths of post-training: advantages, policy losses, KL, aggregation.

Everything here is a function over explicit tensors (no model, no I/O),
registered by name so that a config picks it: ``algo.advantage``,
``algo.policy_loss``, ``algo.loss_agg``, ``algo.kl_estimator``. KL coefficient control
(fixed / adaptive) and the KL-in-reward placement live in :mod:`.kl_control`.
"""

from . import advantages, aggregation, entropy_control, kl, kl_control, policy_losses  # noqa: F401  (registers)
from . import turn_advantages  # noqa: F401,E402  (registers the multi-turn estimators)
from .kl_control import AdaptiveKLController, FixedKLController, build_kl_controller, kl_penalty_rewards
from .registry import (
    ADVANTAGES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    register_advantage,
    register_kl_estimator,
    register_loss_agg,
    register_policy_loss,
)

__all__ = [
    "ADVANTAGES", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES",
    "AdaptiveKLController", "FixedKLController", "build_kl_controller", "kl_penalty_rewards",
    "register_advantage", "register_kl_estimator", "register_loss_agg", "register_policy_loss",
]
