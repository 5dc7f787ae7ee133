"""KL coefficient control and the KL-in-reward placement.

Two places for the KL penalty to the reference policy, chosen by ``algo.kl_in_reward``:

* in the loss (GRPO, DeepSeekMath eq. 3): ``loss_t += kl_coef * kl_t``;
* in the reward (PPO-RLHF, Ziegler et al. 2019 eq. 2; REINFORCE++): per-token reward
  ``-kl_coef * kl_t`` (:func:`kl_penalty_rewards`), which the advantage estimator turns into
  returns (``token_rewards=`` of :mod:`postrl.algorithms.advantages`).

The coefficient is fixed (``algo.kl_coef``) or adapted towards a target KL (``algo.kl_target > 0``):

=========================  ==========================================================  ============================
controller                 coefficient after a step with measured KL                   paper
=========================  ==========================================================  ============================
``FixedKLController``      beta (unchanged)                                            --
``AdaptiveKLController``   e = clip(KL / target - 1, -0.2, 0.2);                       Ziegler et al. 2019,
                           beta <- beta * (1 + e * n_steps / horizon)                  arXiv:1909.08593, Sec. 2.2
=========================  ==========================================================  ============================

Ziegler et al. write ``beta_{t+1} = beta_t (1 + K_beta e_t)`` with ``K_beta = 0.1``; their code
(openai/lm-human-preferences) and verl / OpenRLHF use ``K_beta = n_steps / horizon``, with
``n_steps`` the number of samples (episodes) in the batch just seen. That is the form here.
Controllers keep their coefficient in ``state_dict()`` so a resumed run continues it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .registry import KL_ESTIMATORS

__all__ = ["AdaptiveKLController", "FixedKLController", "build_kl_controller", "kl_penalty_rewards"]

ADAPTIVE_KL_CLIP = 0.2
"""Bound of the proportional error e in Ziegler et al. 2019, Sec. 2.2."""


class FixedKLController:
    """A constant KL coefficient ``value``."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays ``coef``."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient, Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences", arXiv:1909.08593), Sec. 2.2::

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        value = value * (1 + e * n_steps / horizon)

    The coefficient grows while the measured KL is above ``target`` and shrinks while below; the
    clip bounds the change per update to a factor ``1 +- 0.2 * n_steps / horizon``. A non-finite
    ``current_kl`` leaves the coefficient unchanged (one broken measurement must not poison it).
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if init_coef < 0:
            raise ValueError(f"initial KL coefficient must be >= 0, got {init_coef}")
        if target <= 0:
            raise ValueError(f"adaptive KL control needs a target KL > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL control needs a horizon > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -ADAPTIVE_KL_CLIP), ADAPTIVE_KL_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient; ``target`` and ``horizon`` stay those of the config."""
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


def build_kl_controller(cfg) -> FixedKLController | AdaptiveKLController:
    """The controller an ``AlgoConfig`` asks for: adaptive towards ``kl_target`` when
    ``kl_target > 0`` (starting at ``kl_coef``, horizon ``kl_horizon``), else fixed at ``kl_coef``.
    Also accepts the whole ``Config`` (uses its ``algo``)."""
    algo = getattr(cfg, "algo", cfg)
    if algo.kl_target > 0:
        return AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
    return FixedKLController(algo.kl_coef)


def kl_penalty_rewards(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, coef: float,
                       estimator_fn: Callable[[Tensor, Tensor], Tensor] | str) -> Tensor:
    """Per-token KL penalty as a reward, ``-coef * kl_t`` (Ziegler et al. 2019 eq. 2;
    REINFORCE++ arXiv:2501.03262 eq. 8), exactly 0 where ``mask == 0``.

    ``estimator_fn(logprobs, ref_logprobs) -> [B, T]`` is a per-token KL estimator, or the name of
    a registered one (``"k1"``, ``"k2"``, ``"k3"``, see :mod:`postrl.algorithms.kl`). The result is
    detached: it is a reward, not a loss term.

    Shapes: ``logprobs, ref_logprobs, mask [B, T] -> [B, T]``.
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"kl_penalty_rewards: logprobs {tuple(logprobs.shape)}, ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} and mask {tuple(mask.shape)} must have the same shape [B, T]")
    fn = KL_ESTIMATORS.get_fn(estimator_fn) if isinstance(estimator_fn, str) else estimator_fn
    with torch.no_grad():
        kl = fn(logprobs.detach().float(), ref_logprobs.detach().float())
        penalty = -float(coef) * kl
        return torch.where(mask > 0, penalty, torch.zeros_like(penalty))


def reference_reset_due(step: int, every: int) -> bool:
    """ProRL reference resets (Liu et al. 2025, "ProRL: Prolonged Reinforcement Learning Expands
    Reasoning Boundaries in Large Language Models", arXiv:2505.24864, its "reference policy
    reset"): every ``every`` steps the KL reference is hard-reset to the current policy and the
    optimizer state is re-initialised, so the KL term stops anchoring the policy to a stale start.

    ``step`` is the 0-based index of the step about to run; a reset happens before steps
    ``every, 2 every, ...`` (never before step 0, where the reference already is the policy).
    ``every = 0`` turns resets off. Pure: a resumed run asks the same question for the same step.
    """
    if every < 0 or step < 0:
        raise ValueError(f"reference_reset_due: step={step} and every={every} must be >= 0")
    return every > 0 and step > 0 and step % every == 0


def last_reference_reset(step: int, every: int) -> int:
    """The step before which the most recent reset happened (0 = none yet: the reference is the starting
    model), for a run resumed before ``step``: the reference to restore is the policy as it was at the
    start of that step. ``every = 0``: always 0."""
    if every < 0 or step < 0:
        raise ValueError(f"last_reference_reset: step={step} and every={every} must be >= 0")
    return 0 if every == 0 else (step // every) * every
