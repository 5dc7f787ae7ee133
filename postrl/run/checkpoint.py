"""Atomic checkpoints: a Hugging Face model directory plus the trainer state.

Layout of ``RUN_DIR/checkpoints/step_000006/``::

    config.json, model.safetensors, tokenizer files   (plain ``from_pretrained``)
    trainer_state.pt   {"format": 2, "kind", "run_state", "optimizer", "scheduler", "rng", "job"}
                       (see :func:`upgrade_state` for the shapes written by earlier versions)

A checkpoint is written to ``.tmp-step_000006`` and renamed into place, so a
crash while writing never leaves a directory named ``step_*`` that is
incomplete, and the previous checkpoint is untouched.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from postrl.run.files import replace_dir_atomically

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(ckpt_root: Path, step: int, model, tokenizer, trainer_state: dict, keep: int = 0) -> Path:
    """Write ``ckpt_root/step_{step:06d}`` atomically; keep the newest ``keep`` (0 = all)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)

    # re-saving the same step (e.g. Ctrl-C right after a periodic save) replaces it
    final = replace_dir_atomically(ckpt_root / f"step_{step:06d}", write)
    if keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def load_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    return torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)


STATE_FORMAT = 2
_RUN_STATE_KEYS = ("step", "consecutive_nonfinite", "nonfinite_total", "results", "wall_time_s")
_OUTER_KEYS = ("optimizer", "scheduler", "rng")


def upgrade_state(st: dict[str, Any]) -> dict[str, Any]:
    """A ``trainer_state.pt`` of any postrl version in the current shape::

        {"format": 2, "kind": str | None, "run_state": {step, consecutive_nonfinite, nonfinite_total, results,
         wall_time_s}, "optimizer", "scheduler", "rng", "job": {the trainer's own state}}

    Earlier versions wrote two shapes: ``postrl train`` and ``postrl sft`` a ``run_state`` dict next to their
    own keys (``sampler``, ``kl_controller``, ``critic``, ``algo_state``...), ``postrl dpo`` and ``postrl rm``
    the run counters as top-level keys next to theirs (``round``, ``round_data``...). Both become the job
    state of the current shape, so every old checkpoint still resumes.
    """
    if st.get("format") == STATE_FORMAT:
        return st
    if "run_state" in st:  # postrl train / sft before the run package
        run = dict(st["run_state"])
        rest = {k: v for k, v in st.items() if k not in ("run_state", "kind", *_OUTER_KEYS)}
    else:  # postrl dpo / rm before the run package: flat
        run = {k: st[k] for k in _RUN_STATE_KEYS if k in st}
        rest = {k: v for k, v in st.items() if k not in (*_RUN_STATE_KEYS, "kind", *_OUTER_KEYS)}
    run.setdefault("nonfinite_total", 0)
    run.setdefault("consecutive_nonfinite", 0)
    return {"format": STATE_FORMAT, "kind": st.get("kind"), "run_state": run,
            **{k: st[k] for k in _OUTER_KEYS}, "job": rest}


def publish_final(ckpt_dir: Path, run_dir: Path) -> Path:
    """``RUN_DIR/final``: the model directory of checkpoint ``ckpt_dir`` without the trainer state, for
    ``from_pretrained``. Files are hard-linked (copied where links are not possible), so publishing costs no
    second serialization of the weights, and the directory appears whole (written aside, then renamed)."""

    def write(tmp: Path) -> None:
        for f in ckpt_dir.iterdir():
            if f.name == STATE_FILE or not f.is_file():
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)

    return replace_dir_atomically(run_dir / "final", write)
