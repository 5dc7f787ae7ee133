"""What every trainer shares around the optimizer: the clipped step, and stopping after non-finite steps."""

from __future__ import annotations

from pathlib import Path
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


def stop_after_nonfinite_streak(streak: int, limit: int, step: int, checkpoints: Path, unit: str = "steps") -> None:
    """Raise TrainingError once ``streak`` consecutive ``unit`` had a non-finite loss or gradient norm
    (``limit`` = train.max_nonfinite_steps; 0 means stop at the first). A finite step never stops a run."""
    from postrl.trainer.checkpoint import latest_checkpoint
    from postrl.trainer.rl import TrainingError

    if streak >= max(1, limit):
        last = latest_checkpoint(checkpoints)
        raise TrainingError(
            f"{streak} {unit} in a row had a non-finite loss or gradient (last at step {step}); stopping. "
            f"Last good checkpoint: {last if last else 'none written yet'}. Try a lower train.lr or train.grad_clip.")
