"""``postrl train [CONFIG.yaml] [key.sub=value ...] [--resume RUN_DIR]``: RL training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from postrl.api import RECIPES
from postrl.commands._common import add_run_arguments, run_trainer

HELP = "RL training (GRPO family); no CONFIG runs recipes/quickstart.yaml"
ACCEPTS_OVERRIDES = True  # key=value words after options are taken as dotted overrides


def _default_recipe() -> Path:
    """The quickstart recipe, shipped inside the package so that it works from any install."""
    return RECIPES / "quickstart.yaml"


def _print_table(results: dict) -> None:
    before, after = results.get("eval_before"), results.get("eval_after")
    if not before or not after:
        return
    rows = [("held-out accuracy (greedy)", "accuracy", "{:.1%}"), ("held-out reward", "reward_mean", "{:.3f}"),
            ("mean response length", "response_len_mean", "{:.1f}")]
    print()
    print(f"{'':28s} {'before':>10s} {'after':>10s} {'change':>10s}")
    for label, key, fmt in rows:
        b, a = before[key], after[key]
        delta = (f"{(a - b) * 100:+.1f} pt" if key == "accuracy" else f"{a - b:+.3f}")
        print(f"{label:28s} {fmt.format(b):>10s} {fmt.format(a):>10s} {delta:>10s}")
    print(f"(n = {after['n']} held-out problems; wall time {results.get('wall_time_s', 0):.0f} s)")


def run(args: argparse.Namespace) -> int:
    def summary(run_dir: Path, results: dict) -> None:
        _print_table(results)
        _write_report(run_dir)

    return run_trainer(args, "train", summary)


def _write_report(run_dir: Path) -> None:
    """The run's HTML report (postrl report); a failure warns and never fails the finished training."""
    try:
        from postrl.eval.report import build_report

        print(f"report: {build_report(run_dir)}")
    except Exception as exc:  # noqa: BLE001 - the model and metrics are saved; the report can be redone later
        print(f"postrl: warning: could not write the report ({type(exc).__name__}: {exc}); "
              f"retry with: postrl report {run_dir}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "the quickstart recipe", "train.lr=1e-5 rollout.n=4")
