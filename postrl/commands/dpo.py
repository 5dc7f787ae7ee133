"""``postrl dpo CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]``: preference optimization (DPO family)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "preference optimization: DPO, IPO, cDPO, robust DPO, SimPO, ORPO, KTO, SLiC; offline or online"
ACCEPTS_OVERRIDES = True


def _config_path(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    if config is None and args.resume:
        saved = Path(args.resume) / "config.yaml"
        config = str(saved) if saved.is_file() else None
    return config, overrides


def run_command(args: argparse.Namespace, entry: str, default_recipe: str, summary) -> int:
    """Shared by ``postrl dpo`` and ``postrl rm``: load the config, run ``entry``, print the summary."""
    import importlib

    from postrl.commands.train import RECIPES
    from postrl.config import ConfigError, load_config
    from postrl.trainer.rl import TrainingError

    config, overrides = _config_path(args)
    path = Path(config) if config else RECIPES / default_recipe
    module, _, fn = entry.rpartition(".")
    try:
        cfg = load_config(path, overrides)
        run_dir, results = getattr(importlib.import_module(module), fn)(cfg, resume=args.resume)
    except (ConfigError, TrainingError) as exc:
        print(f"postrl: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as exc:
        if type(exc).__name__ in ("DataError", "ModelLoadError"):
            print(f"postrl: error: {exc}", file=sys.stderr)
            return 2
        raise
    if results.get("interrupted"):
        return 130
    summary(results)
    print(f"run directory: {run_dir}")
    return 0


def _summary(results: dict) -> None:
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
    return run_command(args, "postrl.trainer.preference.train_dpo", "dpo.yaml", _summary)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (recipe); default: recipes/dpo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.beta=0.2 preference.path=pairs.jsonl")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
