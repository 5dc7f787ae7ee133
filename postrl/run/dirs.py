"""Where a run lives: a new, never-overwritten directory, or the directory of a run being resumed."""

from __future__ import annotations

from pathlib import Path

from postrl.run.checkpoint import latest_checkpoint
from postrl.run.errors import TrainingError


def fresh_dir(parent: str | Path, name: str) -> Path:
    """``parent/name``, or ``name-2``, ``name-3``... if taken (exists and is not empty), created: an earlier
    run or evaluation is never overwritten."""
    base = Path(parent) / name
    candidate, i = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        i += 1
        candidate = base.with_name(f"{name}-{i}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def new_run_dir(output_dir: str | Path, name: str, run_dir: str | Path | None = None) -> Path:
    """The directory of a new run: ``run_dir`` when given (it must be empty: a run is never overwritten),
    else ``output_dir/name`` made fresh by :func:`fresh_dir`."""
    if run_dir is None:
        return fresh_dir(output_dir, name)
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(f"run directory {run_dir} is not empty; a run is never overwritten")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def resume_checkpoint(resume: str | Path) -> tuple[Path, Path]:
    """``(run_dir, latest complete checkpoint)`` of the run to resume; an error if it has none."""
    run_dir = Path(resume)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise TrainingError(f"--resume {resume}: no complete checkpoint under {run_dir / 'checkpoints'}")
    return run_dir, ckpt
