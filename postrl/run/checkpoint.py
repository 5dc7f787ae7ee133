"""Atomic checkpoints: a Hugging Face model directory plus the trainer state.

Layout of ``RUN_DIR/checkpoints/step_000006/``::

    config.json, model.safetensors, tokenizer files   (plain ``from_pretrained``)
    trainer_state.pt   {"format": 2, "kind", "run_state", "optimizer", "scheduler", "rng", "job"}
                       (see :func:`upgrade_state` for the shapes written by earlier versions)
    sharded/           train.strategy=fsdp only: torch.distributed.checkpoint (DCP) of the sharded model and
                       optimizer state (and the PPO critic's), one file per rank; ``optimizer`` above is None

A run of several ranks (docs/scaling.md) writes the same directory: rank 0 the model (gathered), tokenizer
and trainer state (with every rank's RNG in ``rng_ranks``), every rank its shards, and rank 0 renames the
directory into place once all have written (:func:`save_checkpoint_distributed`). DCP reshards on load, so a
checkpoint of N ranks resumes with any number of ranks and in one process (:func:`load_sharded`).

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
SHARDED_DIR = "sharded"
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


def publish_final(ckpt_dir: Path, run_dir: Path, model: Any = None, tokenizer: Any = None) -> Path:
    """``RUN_DIR/final``: the model directory of checkpoint ``ckpt_dir`` without the trainer state, for
    ``from_pretrained``. Files are hard-linked (copied where links are not possible), so publishing costs no
    second serialization of the weights, and the directory appears whole (written aside, then renamed).
    A LoRA run (``model`` a PEFT model) checkpoints its adapter; ``final/merged/`` then also holds the model
    with the adapter merged in (postrl/models/lora.py)."""

    def write(tmp: Path) -> None:
        for f in ckpt_dir.iterdir():
            if f.name == STATE_FILE or not f.is_file():
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        if model is not None:
            from postrl.models.lora import MERGED_DIR, is_lora_model, save_merged

            if is_lora_model(model):
                save_merged(model, tokenizer, tmp / MERGED_DIR)

    return replace_dir_atomically(run_dir / "final", write)


def load_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Copy the weights of checkpoint ``ckpt_dir`` (its ``*.safetensors`` files, sharded or not) into ``model``
    in place; tied weights that are saved once (e.g. an LM head tied to the embeddings) follow their tie."""
    from safetensors.torch import load_file

    from postrl.models.lora import is_adapter_dir, load_adapter_weights

    if is_adapter_dir(ckpt_dir):  # a LoRA run: the checkpoint holds the adapter, the base weights never change
        load_adapter_weights(model, ckpt_dir)
        return
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no *.safetensors weights")
    missing = set(model.state_dict())
    for f in files:
        state = load_file(str(f))
        model.load_state_dict(state, strict=False)
        missing -= set(state)
    tied = {name for name in missing if "lm_head" in name or "embed" in name}
    if missing - tied:
        raise KeyError(f"{ckpt_dir}: weights missing for {sorted(missing - tied)[:5]}")


def _dcp_states(sharded: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = {}
    for name, (module, optimizer) in sharded.items():
        model_sd, optim_sd = get_state_dict(module, optimizer)
        out[name] = {"model": model_sd, "optim": optim_sd}
    return out


def save_checkpoint_distributed(dist: Any, ckpt_root: Path, step: int, model, tokenizer, trainer_state: dict,
                                keep: int = 0, sharded: dict[str, tuple[Any, Any]] | None = None) -> Path:
    """:func:`save_checkpoint` for a run of several ranks; every rank calls it (``dist``: the
    :class:`postrl.run.distributed.Dist`). ``sharded`` (FSDP): ``{name: (module, optimizer)}`` written with
    ``torch.distributed.checkpoint`` into ``sharded/``, each rank its shards; the model is also gathered for
    rank 0's Hugging Face files. Without ``sharded`` (DDP: every rank holds the same state), rank 0 writes what
    one process writes. The directory appears whole or not at all."""
    import torch.distributed.checkpoint as dcp

    full = dist.full_state_dict(model)  # a collective under FSDP
    states = _dcp_states(sharded) if sharded else None
    target = ckpt_root / f"step_{step:06d}"

    def write(tmp: Path) -> None:  # rank 0, in a hidden directory that is renamed when every rank has written
        dist.broadcast(str(tmp))
        if states is not None:
            dcp.save(states, checkpoint_id=str(tmp / SHARDED_DIR))
        model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        dist.barrier()

    if dist.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        final = replace_dir_atomically(target, write)
        if keep > 0:
            for old in list_checkpoints(ckpt_root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    else:
        tmp = Path(dist.broadcast(None))
        if states is not None:
            dcp.save(states, checkpoint_id=str(tmp / SHARDED_DIR))
        dist.barrier()
        final = target
    dist.barrier()  # renamed: every rank sees the checkpoint
    return final


def load_full_optimizer(model, optimizer, state: dict[str, Any]) -> None:
    """Load a one-process ``optimizer.state_dict()`` (parameters by index, in the order of the model's trainable
    parameters, as every trainer builds its optimizer) into the optimizer of an FSDP ``model``: every rank keeps
    its shard of each state tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name,
                             options=StateDictOptions(full_state_dict=True))


def load_sharded(ckpt_dir: Path, sharded: dict[str, tuple[Any, Any]]) -> None:
    """Load ``ckpt_dir/sharded`` into ``{name: (module, optimizer)}`` in place: FSDP modules of any number of
    ranks, or plain modules (one process, DDP). Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    states = _dcp_states(sharded)
    dcp.load(states, checkpoint_id=str(ckpt_dir / SHARDED_DIR))
    for name, (module, optimizer) in sharded.items():
        set_state_dict(module, optimizer, model_state_dict=states[name]["model"],
                       optim_state_dict=states[name]["optim"])
