"""Combining several rewards into the scalar the advantage estimator sees.

``sum_then_normalize`` (the default, as in GRPO with a summed reward)::

    r_i = sum_k w_k r_{i,k}

and the advantage estimator then normalizes ``r`` within each group. With rewards on very
different scales (a 0/1 correctness reward plus a 0..0.2 format reward), the summed reward's
group statistics are dominated by the larger one and distinct reward combinations can collapse
onto the same advantage. ``normalize_each_then_sum`` standardizes each reward within its prompt
group before the weighted sum (group reward-decoupled normalization, GDPO: Liu et al. 2026,
"GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL
Optimization", arXiv:2601.05242)::

    r_i = sum_k w_k (r_{i,k} - mean_{g(i)}(r_k)) / (std_{g(i)}(r_k) + eps)

with population std over the ``group_size`` completions of the same prompt. A reward that is
constant within a group contributes 0 there. The advantage estimator still runs on ``r``
(GDPO then normalizes the sum over the batch; with GRPO's group normalization the sum is
re-standardized per group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

COMBINE_MODES = ("sum_then_normalize", "normalize_each_then_sum")


def combine_rewards(components: Mapping[str, torch.Tensor], weights: Mapping[str, float], group_size: int,
                    mode: str = "sum_then_normalize", eps: float = 1e-6) -> torch.Tensor:
    """Weighted combination of per-completion rewards ``components[name]: [B]`` -> ``[B]``.

    ``B`` must be a multiple of ``group_size`` (completions of one prompt are consecutive).
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"reward combination mode {mode!r} is not one of {', '.join(COMBINE_MODES)}")
    if not components:
        raise ValueError("combine_rewards needs at least one reward component")
    missing = [k for k in components if k not in weights]
    if missing:
        raise ValueError(f"combine_rewards: no weight for reward(s) {missing}")
    sizes = {name: tuple(v.shape) for name, v in components.items()}
    if len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
        raise ValueError(f"combine_rewards: every component must be a 1-D tensor of the same length, got {sizes}")
    n = next(iter(components.values())).shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"combine_rewards: batch of {n} is not a multiple of group_size={group_size}")
    total = torch.zeros(n, dtype=torch.float64)
    for name, values in components.items():
        v = values.to(torch.float64)
        if mode == "normalize_each_then_sum":
            g = v.view(-1, group_size)
            v = ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, unbiased=False, keepdim=True) + eps)).view(-1)
        total = total + float(weights[name]) * v
    return total.to(torch.float32)


def combine_lists(components: Mapping[str, Sequence[float]], weights: Mapping[str, float], group_size: int,
                  mode: str = "sum_then_normalize", eps: float = 1e-6) -> list[float]:
    """:func:`combine_rewards` on plain lists (the trainer keeps rewards as lists)."""
    tensors = {k: torch.tensor(list(v), dtype=torch.float64) for k, v in components.items()}
    return combine_rewards(tensors, weights, group_size, mode, eps).tolist()
