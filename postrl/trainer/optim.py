"""The optimizer step every trainer shares: clip the global gradient norm, step only when it is finite."""

from __future__ import annotations

from typing import Iterable

import torch


def clipped_step(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer, grad_clip: float,
                 finite: bool = True) -> tuple[float, bool]:
    """Clip the gradients of ``params`` to global norm ``grad_clip`` (<= 0: no clipping, the norm is still
    measured) and take the optimizer step if the loss was ``finite`` and the norm is finite.

    Returns ``(norm before clipping, stepped)``; the norm is NaN when the loss was not finite. The caller
    zeroes the gradients and steps the learning-rate schedule.
    """
    if not finite:
        return float("nan"), False
    clip = grad_clip if grad_clip > 0 else float("inf")
    gnorm = float(torch.nn.utils.clip_grad_norm_(list(params), clip))
    ok = bool(torch.isfinite(torch.tensor(gnorm)))
    if ok:
        optimizer.step()
    return gnorm, ok
