"""Policy losses: per-token loss terms, to be aggregated by ``aggregation``.

=============  ================================================================  ======================
name           per-token loss, ratio rho = exp(logp - logp_old)                 paper
=============  ================================================================  ======================
``ppo_clip``   -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)          PPO (Schulman et al.
                                                                                2017) eq. 7; GRPO
                                                                                (DeepSeekMath eq. 3);
                                                                                asymmetric bounds:
                                                                                DAPO "clip-higher"
=============  ================================================================  ======================

GRPO as postrl runs it by default = ``advantage: grpo`` + ``policy_loss: ppo_clip``
+ ``loss_agg: token_mean`` (+ optional ``kl_coef`` with the k3 estimator). Note the
aggregation: DeepSeekMath eq. 3 averages each completion's tokens (1/|o_i|) and
then the group; ``token_mean`` is the token-level average that DAPO (eq. 12) and
most GRPO implementations use. The per-sequence variants come with the
algorithm library.

Every loss returns ``(loss_tokens [B, T], stats)`` where ``stats`` holds
per-token diagnostics (e.g. ``clipped`` as float 0/1) for logging.

A loss whose value and gradient are exactly 0 wherever the advantage is 0
sets ``fn.zero_at_zero_advantage = True``; the trainer then skips the
forward/backward of such sequences (same gradient, less compute).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_policy_loss


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate, PPO (arXiv:1707.06347) eq. 7, as a loss to minimise.

    ``loss_t = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A)``
    with ``rho_t = exp(logprobs_t - old_logprobs_t)``. ``advantages`` is
    ``[B]`` (one per sequence, broadcast over tokens) or ``[B, T]``.
    ``stats["clipped"]`` is 1 where the clipped term was the active one
    (the gradient through that token is zero).

    Shapes: ``logprobs, old_logprobs [B, T]``; returns ``[B, T]``.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, {"clipped": (clipped < unclipped).float(), "ratio": ratio.detach()}


ppo_clip_loss.zero_at_zero_advantage = True  # -min(r * 0, clip(r) * 0) == 0 for every r
