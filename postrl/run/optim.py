"""What every trainer shares around the optimizer: AdamW with its learning-rate schedule, the clipped step,
and stopping after non-finite steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from postrl.run.checkpoint import latest_checkpoint
from postrl.run.errors import TrainingError


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base learning rate at update ``step``: linear warm-up over ``warmup`` updates, then
    constant, linear decay to 0 or cosine decay to 0 at ``total``."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def adamw_implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """The fastest AdamW kernel for ``params``: ``fused`` (one kernel over every tensor; CPU and CUDA, float
    tensors of one device) where torch has it, else torch's default. The update equals the per-tensor loop's
    to float rounding (``tests/test_speed_equivalence.py``). Sharded (DTensor) parameters keep the default."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if not params or any(isinstance(p, DTensor) or isinstance(p.data, DTensor) for p in params):
        return {}
    devices = {p.device.type for p in params}
    if len(devices) != 1 or devices - {"cpu", "cuda"} or not all(p.is_floating_point() for p in params):
        return {}
    return {"fused": True}


def build_optimizer(params: list[torch.Tensor], train: Any, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` with ``train.lr`` / ``adam_betas`` / ``weight_decay`` and the ``train.lr_schedule``
    (with ``warmup_steps``) planned over ``total_steps`` scheduler steps."""
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.adam_betas), weight_decay=train.weight_decay,
                                  **adamw_implementation(params))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(train.lr_schedule, train.warmup_steps, total_steps))
    return optimizer, scheduler


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


def accumulated_update(items: list, micro: int, loss_of: Callable[[list], tuple[torch.Tensor, dict[str, float]]],
                       params: list[torch.Tensor], optimizer: torch.optim.Optimizer, scheduler, grad_clip: float,
                       dist=None, train_model=None) -> tuple[dict[str, float], float, float, bool]:
    """One optimizer update over ``items``, in micro batches of ``micro`` with gradients accumulated.

    ``loss_of(chunk)`` returns the chunk's loss, already normalised over the whole batch (so the chunk losses
    add up to the batch loss), and statistics summed over the chunk's rows. Under ``dist``
    (:class:`postrl.run.distributed.Dist`) each rank takes its share of ``items``; ranks with fewer chunks run
    zero-weight passes (``loss_of`` on the first item, loss times 0, statistics not counted) so that every rank
    makes the same collective calls, and every rank steps or none does. A non-finite loss skips the step.

    Returns ``(sums, lr, grad_norm, stepped)``: ``sums["loss"]`` is the batch loss and the other entries the
    statistics summed over the batch (over all ranks), ``lr`` the learning rate the step used. The gradients
    are zeroed and the schedule stepped in every case.
    """
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {"loss": 0.0}
    finite = True
    chunks: list = [items[s:s + micro] for s in range(0, len(items), micro)]
    if dist is not None:
        mine = dist.share(items)
        chunks = dist.pad_chunks([mine[s:s + micro] for s in range(0, len(mine), micro)])
    for k, chunk in enumerate(chunks):
        if dist is not None:
            dist.set_grad_sync(train_model, last=k == len(chunks) - 1)
        loss, stats = loss_of(chunk if chunk is not None else items[:1])
        if chunk is None:
            loss = loss * 0.0
        if not torch.isfinite(loss):
            finite = False
            if dist is None:
                break
        if dist is None:
            loss.backward()
        else:
            dist.backward(loss)
        sums["loss"] += float(loss.detach())
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + (float(value) if chunk is not None else 0.0)
    if dist is not None:  # every rank steps or none; each sum is the ranks' parts added up
        finite = dist.all_true(finite)
        sums = dict(zip(sums, dist.sums(list(sums.values()))))
    lr = scheduler.get_last_lr()[0]
    gnorm, ok = clipped_step(params, optimizer, grad_clip, finite)
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return sums, lr, gnorm, ok


def stop_after_nonfinite_streak(streak: int, limit: int, step: int, checkpoints: Path, unit: str = "steps") -> None:
    """Raise TrainingError once ``streak`` consecutive ``unit`` had a non-finite loss or gradient norm
    (``limit`` = train.max_nonfinite_steps; 0 means stop at the first). A finite step never stops a run."""
    if streak >= max(1, limit):
        last = latest_checkpoint(checkpoints)
        raise TrainingError(
            f"{streak} {unit} in a row had a non-finite loss or gradient (last at step {step}); stopping. "
            f"Last good checkpoint: {last if last else 'none written yet'}. Try a lower train.lr or train.grad_clip.")


@torch.no_grad()
def parameters_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite: one norm per tensor (a NaN or inf anywhere makes that
    tensor's norm non-finite), so the check reads the weights once and allocates nothing of their size."""
    params = [p for p in model.parameters()]
    if not params:
        return True
    norms = torch._foreach_norm(params) if hasattr(torch, "_foreach_norm") else [p.norm() for p in params]
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
