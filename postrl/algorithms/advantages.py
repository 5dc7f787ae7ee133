"""Advantage estimators: rewards (and later values) -> advantages.

Which published method uses which estimator:

=============  =====================================================  ==========================
name           advantage of completion i in group g                    paper
=============  =====================================================  ==========================
``grpo``       (r_i - mean_g(r)) / (std_g(r) + eps)                    DeepSeekMath (Shao et al.
                                                                       2024), Sec. 4.1.2
=============  =====================================================  ==========================

All estimators take ``rewards`` of shape ``[B]`` laid out group by group
(``B = num_groups * group_size``; completions ``g*n .. g*n+n-1`` share a
prompt) and return one advantage per completion, ``[B]``, which the loss
broadcasts over that completion's tokens (outcome supervision).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_advantage


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards does not split into groups of {group_size}")
    return rewards.view(-1, group_size)


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6, std_scope: str = "group") -> Tensor:
    """GRPO outcome advantages, DeepSeekMath (arXiv:2402.03300) Sec. 4.1.2:
    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``.

    ``std_scope``: ``"group"`` (the paper), ``"batch"`` (std over the whole
    batch, as in REINFORCE++-baseline / Dr. GRPO discussions) or ``"none"``
    (no division). The std is the population std (divide by n), so a group of
    two rewards {0, 1} gets advantages {-1, +1}. A group whose rewards are all
    equal gets advantage 0 for every member.

    Shapes: ``rewards [B] -> [B]``.
    """
    groups = _groups(rewards.float(), group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if std_scope == "group":
        scale = groups.std(dim=1, unbiased=False, keepdim=True)
    elif std_scope == "batch":
        scale = rewards.float().std(unbiased=False).expand_as(groups)
    elif std_scope == "none":
        return centered.reshape(-1)
    else:
        raise ValueError(f"std_scope={std_scope!r}; valid: group, batch, none")
    return (centered / (scale + eps)).reshape(-1)
