"""``postrl sft CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]``: supervised fine-tuning."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "supervised fine-tuning on prompt/completion, messages or text data (loss on completion tokens)"
ACCEPTS_OVERRIDES = True

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def resolve_config(config: str | None, overrides: list[str], resume: str | None, default: Path) -> tuple[Path, list[str]]:
    """The config path and overrides, as ``postrl train`` takes them (a leading key=value is an override;
    with --resume and no config, the run's own config.yaml)."""
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    if config is None and resume:
        saved = Path(resume) / "config.yaml"
        config = str(saved) if saved.is_file() else None
    return (Path(config) if config else default), overrides


def run(args: argparse.Namespace) -> int:
    from postrl.config import ConfigError, load_config
    from postrl.data.sources import DataError
    from postrl.trainer import TrainingError
    from postrl.trainer.sft import train_sft

    path, overrides = resolve_config(args.config, list(args.overrides), args.resume, RECIPES / "sft.yaml")
    try:
        cfg = load_config(path, overrides)
        run_dir, results = train_sft(cfg, resume=args.resume)
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
    before, after = results.get("eval_before"), results.get("eval_after")
    data = results.get("data", {}).get("train", {})
    print(f"\ntrained {results['steps']} steps on {data.get('examples', 0)} examples "
          f"({data.get('truncated', 0)} truncated, {data.get('dropped_too_long', 0)} dropped as too long)")
    if before and after:
        print(f"held-out completion loss: {before['loss']:.4f} -> {after['loss']:.4f} (n = {after['n']})")
    print(f"run directory: {run_dir}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config; default: the sft recipe (recipes/sft.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.path=data.jsonl train.lr=1e-5")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
