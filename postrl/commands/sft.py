"""``postrl sft CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]``: supervised fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from postrl.commands._common import add_run_arguments, run_trainer

HELP = "supervised fine-tuning on prompt/completion, messages or text data (loss on completion tokens)"
ACCEPTS_OVERRIDES = True


def run(args: argparse.Namespace) -> int:
    return run_trainer(args, "sft", _summary)


def _summary(run_dir: Path, results: dict) -> None:
    before, after = results.get("eval_before"), results.get("eval_after")
    data = results.get("data", {}).get("train", {})
    print(f"\ntrained {results['steps']} steps on {data.get('examples', 0)} examples "
          f"({data.get('truncated', 0)} truncated, {data.get('dropped_too_long', 0)} dropped as too long)")
    if before and after:
        print(f"held-out completion loss: {before['loss']:.4f} -> {after['loss']:.4f} (n = {after['n']})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "the sft recipe (recipes/sft.yaml)", "sft.path=data.jsonl train.lr=1e-5")
