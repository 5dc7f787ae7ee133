"""``postrl rm CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]``: reward-model training (Bradley-Terry)."""

from __future__ import annotations

import argparse
from pathlib import Path

from postrl.commands._common import add_run_arguments, run_trainer

HELP = "reward-model training on chosen/rejected pairs (Bradley-Terry loss, optional margin)"
ACCEPTS_OVERRIDES = True


def _summary(run_dir: Path, results: dict) -> None:
    before, after = results.get("eval_before") or {}, results.get("eval_after") or {}
    if before.get("n") and after.get("n"):
        print()
        print(f"{'':30s} {'before':>10s} {'after':>10s}")
        print(f"{'held-out pairwise accuracy':30s} {before['accuracy']:>10.1%} {after['accuracy']:>10.1%}")
        print(f"{'held-out mean margin':30s} {before['margin_mean']:>10.3f} {after['margin_mean']:>10.3f}")
        print(f"(n = {after['n']} held-out pairs; wall time {results.get('wall_time_s', 0):.0f} s)")
    if results.get("final_model"):
        print(f"reward model: {results['final_model']}  (use: rewards: [{{name: reward_model, kwargs: "
              f"{{path: {results['final_model']}}}}}])")


def run(args: argparse.Namespace) -> int:
    return run_trainer(args, "rm", _summary)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "recipes/rm.yaml", "train.lr=1e-5 preference.path=pairs.jsonl")
