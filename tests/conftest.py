"""Shared fixtures: a tiny local model and a toy verifiable task (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from postrl.config import load_config
from postrl.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def write_copy_task(path: Path, n: int = 200, seed: int = 0) -> Path:
    """JSONL toy task: the prompt shows a digit, the verifiable answer is that digit."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            d = rng.randrange(10)
            f.write(json.dumps({"prompt": f"copy {d}", "answer": str(d)}) + "\n")
    return path


@pytest.fixture(scope="session")
def copy_task(tmp_path_factory) -> Path:
    return write_copy_task(tmp_path_factory.mktemp("data") / "copy.jsonl")


@pytest.fixture
def tiny_config(tiny_model_dir, copy_task, tmp_path):
    """``make(**overrides)`` -> Config for a fast run of the tiny model on the copy task."""

    def make(*overrides: str):
        base = [
            f"model.name_or_path={tiny_model_dir}",
            "data.source=jsonl", f"data.path={copy_task}", "data.eval_size=20",
            "data.answer_extraction=raw",
            "rollout.n=4", "rollout.max_new_tokens=1",
            "train.prompts_per_step=4", "train.micro_batch_size=8", "train.steps=3", "train.lr=1e-3",
            "eval.before=false", "eval.after=false",
            f"run.output_dir={tmp_path / 'runs'}", "run.name=t", "run.progress=false",
        ]
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that set run.threads must not leave torch's thread count changed for the next test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def update_grads(trainer, batch, **attributes) -> list[torch.Tensor]:
    """The (clipped) gradients the optimizer receives in the first mini batch of ``trainer.update(batch, 0)``
    after setting the trainer's ``attributes`` (e.g. ``sort_micro_batches=False``); the weights are restored."""
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    captured: list[torch.Tensor] = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: captured.extend(p.grad.clone() for p in trainer.params)
    for name, value in attributes.items():
        setattr(trainer, name, value)
    try:
        trainer.update(batch, 0)
    finally:
        trainer.optimizer.step = step
        trainer.model.load_state_dict(state)
    return captured
