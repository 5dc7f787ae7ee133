"""Critic (value function) losses for PPO with a learned value model.

``clipped_value_loss``: PPO's value loss with the value-clipping trick used by the
OpenAI baselines / PPO-RLHF implementations (Ziegler et al. 2019, arXiv:1909.08593;
"Implementation Matters in Deep Policy Gradients", Engstrom et al. 2020, arXiv:2005.12729,
Sec. 3 "value function clipping")::

    v_clip = v_old + clip(v - v_old, -eps_v, +eps_v)
    loss_t = 0.5 * max((v - R)^2, (v_clip - R)^2)

with ``R`` the return target (GAE's ``A + V_old``). ``eps_v = 0`` turns clipping off.
"""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """Per-token clipped value loss and a 0/1 tensor marking where the clipped branch was larger.

    Shapes: ``values, old_values, returns [B, T]`` -> ``(loss [B, T], clipped [B, T])``; aggregate with
    a mask (e.g. ``token_mean``).
    """
    unclipped = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def shared_backbone_loss(policy_loss: Tensor, value_loss: Tensor, value_coef: float) -> Tensor:
    """The one loss of a policy and a value head that share a backbone (PPO, Schulman et al. 2017,
    arXiv:1707.06347, eq. 9, ``L = L_CLIP - c1 L_VF + c2 S`` as a loss to minimise, the entropy term
    being the trainer's ``entropy_coef``): ``policy_loss + value_coef * value_loss``. One backward pass
    trains the backbone for both; ``value_coef = c1`` weighs the critic's regression against the
    policy's objective (the paper's Atari setting uses 1, many LLM recipes 0.5 or less).
    Both inputs are already aggregated scalars. ``value_coef`` must be >= 0.
    """
    if not value_coef >= 0:
        raise ValueError(f"value_coef must be >= 0, got {value_coef}")
    return policy_loss + float(value_coef) * value_loss
