"""DAPO reward shaping and batch selection (Yu et al. 2025, arXiv:2503.14476).

=========================  ==============================================================  ==============
function                   what it does                                                    DAPO
=========================  ==============================================================  ==============
``overlong_penalty``       length reward: 0, then a linear ramp to ``-penalty`` over the   Sec. 3.4,
                           last ``buffer`` tokens before ``max_len``                       eq. 13
``overlong_filter_mask``   truncated completions leave the loss (mask rows zeroed)         Sec. 3.4
``dynamic_sampling_keep``  keep groups whose rewards are not all equal                     Sec. 3.2,
                                                                                           eq. 11
=========================  ==============================================================  ==============

Pure functions over tensors; the trainer decides when to call them (``algo.overlong_buffer``,
``algo.overlong_penalty``, ``algo.overlong_filter``, ``algo.dynamic_sampling``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """Soft overlong punishment, DAPO (arXiv:2503.14476) eq. 13, scaled by ``penalty``.

    With ``L_max = max_len``, ``L_cache = buffer`` and ``|y|`` the completion length::

        R_length(y) = 0                                    if |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                    = -1                                   if |y| > L_max

    times ``penalty`` (verl's ``overlong_buffer.penalty_factor``). The ramp is continuous: it is
    0 at ``|y| = L_max - L_cache`` and reaches exactly ``-penalty`` at ``|y| = L_max`` (so a
    completion cut off at the budget gets the full penalty), and stays there beyond. Added to the
    task reward. ``buffer = 0`` means no ramp: 0 up to ``max_len``, ``-penalty`` beyond.

    ``lengths`` counts generated tokens the way ``max_len`` does (``rollout.max_new_tokens``, EOS
    included). Shapes: ``lengths [B]`` -> ``[B]`` float32.
    """
    if buffer < 0 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in [0, max_len={max_len}], got {buffer}")
    if penalty < 0:
        raise ValueError(f"overlong penalty must be >= 0, got {penalty}")
    lengths = torch.as_tensor(lengths).to(torch.float32)
    if buffer == 0:
        return torch.where(lengths > max_len, -float(penalty), 0.0).to(torch.float32)
    ramp = ((max_len - buffer) - lengths) / buffer * penalty
    return ramp.clamp(min=-float(penalty), max=0.0)


def overlong_filter_mask(mask: Tensor, truncated: Tensor) -> Tensor:
    """Overlong filtering, DAPO Sec. 3.4: the loss mask of every truncated completion (it hit the
    length budget without finishing) is zeroed, so its noisy reward does not train the policy.

    Shapes: ``mask [B, T]``, ``truncated [B]`` (bool) -> ``[B, T]`` with ``mask``'s dtype.
    """
    truncated = torch.as_tensor(truncated, device=mask.device).bool()
    if truncated.shape != mask.shape[:1]:
        raise ValueError(f"truncated {tuple(truncated.shape)} must have shape [B] = [{mask.shape[0]}]")
    return mask * (~truncated).to(mask.dtype)[:, None]


def dynamic_sampling_keep(rewards: Tensor, group_size: int) -> Tensor:
    """Dynamic sampling, DAPO Sec. 3.2 (eq. 11's constraint ``0 < |{o_i correct}| < G``, generalised
    to any reward): a group whose rewards are all equal has advantage 0 everywhere and gives no
    gradient, so it is dropped. Returns one bool per group, True = keep (rewards not all equal,
    compared exactly).

    Shapes: ``rewards [B]`` laid out group by group (``B = num_groups * group_size``) ->
    ``[num_groups]`` bool.
    """
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards does not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    return groups.amax(dim=1) != groups.amin(dim=1)
