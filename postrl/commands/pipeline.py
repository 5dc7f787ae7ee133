"""``postrl pipeline CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]``: stages such as sft -> dpo -> grpo."""

from __future__ import annotations

import argparse
from pathlib import Path

from postrl.commands._common import run_trainer

HELP = "run named stages in order (e.g. sft -> dpo -> grpo), each from the previous stage's weights"
ACCEPTS_OVERRIDES = True


def run(args: argparse.Namespace) -> int:
    return run_trainer(args, "pipeline", _summary)


def _summary(run_dir: Path, results: dict) -> None:
    from postrl.trainer.pipeline import format_table

    print()
    print(format_table(results))
    print(f"final model: {results.get('final_model')}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config with a `stages:` list; default: recipes/pipeline_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 stages.0.config.sft.epochs=2")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the pipeline in RUN_DIR: finished stages are skipped, the current one resumes")
