"""``postrl pipeline CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]``: stages such as sft -> dpo -> grpo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "run named stages in order (e.g. sft -> dpo -> grpo), each from the previous stage's weights"
ACCEPTS_OVERRIDES = True

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def run(args: argparse.Namespace) -> int:
    from postrl.commands.sft import resolve_config
    from postrl.config import ConfigError, load_config
    from postrl.data.sources import DataError
    from postrl.trainer import TrainingError
    from postrl.trainer.pipeline import format_table, run_pipeline

    path, overrides = resolve_config(args.config, list(args.overrides), args.resume, RECIPES / "pipeline_tiny.yaml")
    try:
        cfg = load_config(path, overrides)
        run_dir, results = run_pipeline(cfg, resume=args.resume)
    except (ConfigError, TrainingError, DataError) as exc:
        print(f"postrl: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as exc:
        if type(exc).__name__ == "ModelLoadError":
            print(f"postrl: error: {exc}", file=sys.stderr)
            return 2
        raise
    if results.get("interrupted"):
        return 130
    print()
    print(format_table(results))
    print(f"final model: {results.get('final_model')}")
    print(f"run directory: {run_dir}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config with a `stages:` list; default: recipes/pipeline_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 stages.0.config.sft.epochs=2")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the pipeline in RUN_DIR: finished stages are skipped, the current one resumes")
