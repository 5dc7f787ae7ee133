"""Where a run lives: a new, never-overwritten directory, or the directory of a run being resumed."""

from __future__ import annotations

import os
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


def check_writable_dir(path: str | Path, what: str) -> None:
    """Refuse, before anything is loaded or written, a ``path`` (a directory to create or write into) that is a
    file, or under a file, or in a place this process cannot write."""
    path = Path(path)
    probe = path
    while not probe.exists():  # the nearest existing ancestor must be a writable directory
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise TrainingError(f"{what} {path}: {probe} is a file, not a directory; give a directory path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise TrainingError(f"{what} {path}: {probe} is not writable by this user; give a directory you can write")


def resume_checkpoint(resume: str | Path) -> tuple[Path, Path]:
    """``(run_dir, latest complete checkpoint)`` of the run to resume; an error if it has none."""
    run_dir = Path(resume)
    if not run_dir.exists():
        raise TrainingError(f"--resume {resume}: no such run directory")
    if not run_dir.is_dir():
        raise TrainingError(f"--resume {resume}: a file, not a run directory (give the directory that holds "
                            "config.yaml and checkpoints/)")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise TrainingError(f"--resume {resume}: no complete checkpoint under {run_dir / 'checkpoints'}")
    return run_dir, ckpt
