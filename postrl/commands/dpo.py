"""``postrl dpo CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]``: preference optimization (DPO family)."""

from __future__ import annotations

import argparse
from pathlib import Path

from postrl.commands._common import add_run_arguments, run_trainer

HELP = "preference optimization: DPO, IPO, cDPO, robust DPO, SimPO, ORPO, KTO, SLiC; offline or online"
ACCEPTS_OVERRIDES = True


def _summary(run_dir: Path, results: dict) -> None:
    before, after = results.get("eval_before") or {}, results.get("eval_after") or {}
    if not before.get("n") or not after.get("n"):
        return
    rows = [("held-out accuracy", "accuracy", "{:.1%}")]
    rows += [("held-out mean margin", "margin_mean", "{:.3f}"), ("held-out loss", "loss", "{:.4f}"),
             ("chosen logp > rejected logp", "logp_accuracy", "{:.1%}"),
             ("held-out reward", "reward_mean", "{:.3f}")]
    print()
    print(f"{'':30s} {'before':>10s} {'after':>10s}")
    for label, key, fmt in rows:
        if key in before and key in after:
            print(f"{label:30s} {fmt.format(before[key]):>10s} {fmt.format(after[key]):>10s}")
    print(f"(n = {after['n']} held-out {'problems' if 'reward_mean' in after else 'pairs'}; "
          f"loss {results.get('loss')}; wall time {results.get('wall_time_s', 0):.0f} s)")
    if results.get("final_model"):
        print(f"final model: {results['final_model']}")


def run(args: argparse.Namespace) -> int:
    return run_trainer(args, "dpo", _summary)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "recipes/dpo.yaml", "preference.beta=0.2 preference.path=pairs.jsonl")
