"""What the training commands share (train, sft, rm, dpo, pipeline): arguments, config resolution, errors.
(Not a subcommand: the CLI skips modules whose name starts with "_".)

Each command is ``run_trainer(args, trainer_fn, default_recipe, summary)``: load the recipe with its dotted
overrides, call ``trainer_fn(cfg, resume=...)``, turn bad input into exit code 2 with one message, Ctrl-C
into 130, and print the command's summary followed by ``run directory: <path>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # also reachable as ./recipes in a checkout


def report_input_error(exc: BaseException, extra: tuple[type, ...] = ()) -> bool:
    """Print ``postrl: error: ...`` and return True when ``exc`` means bad input (a config, data, model or
    ``extra`` error: exit code 2 without a traceback); False for anything else (a bug: re-raise it)."""
    from postrl.config import ConfigError
    from postrl.data.sources import DataError
    from postrl.models.loading import ModelLoadError

    if isinstance(exc, (ConfigError, DataError, ModelLoadError, *extra)):
        print(f"postrl: error: {exc}", file=sys.stderr)
        return True
    return False


def add_run_arguments(p: argparse.ArgumentParser, default: str, example: str) -> None:
    """``[CONFIG] [key=value ...] [--resume RUN_DIR]``."""
    p.add_argument("config", nargs="?", help=f"YAML config (recipe); default: {default}")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")


def resolve_config(config: str | None, overrides: list[str], resume: str | None, default: Path) -> tuple[Path, list[str]]:
    """The config path and overrides: a leading ``key=value`` is an override of the default recipe; with
    ``--resume`` and no config, the run's own ``config.yaml``."""
    overrides = list(overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    if config is None and resume:
        saved = Path(resume) / "config.yaml"
        config = str(saved) if saved.is_file() else None
    return (Path(config) if config else default), overrides


def run_trainer(args: argparse.Namespace, trainer_fn: Callable[..., tuple[Path, dict[str, Any]]], default: Path,
                summary: Callable[[Path, dict[str, Any]], None]) -> int:
    from postrl.config import load_config
    from postrl.run.errors import TrainingError

    path, overrides = resolve_config(args.config, args.overrides, args.resume, default)
    try:
        # the run's own saved config may have been written by an earlier postrl: migrate keys that moved
        saved = args.resume is not None and path.resolve() == (Path(args.resume) / "config.yaml").resolve()
        cfg = load_config(path, overrides, migrate=saved)
        run_dir, results = trainer_fn(cfg, resume=args.resume)
    except (ValueError, RuntimeError, OSError) as exc:
        if report_input_error(exc, (TrainingError,)):
            return 2
        raise
    if results.get("interrupted"):
        return 130
    summary(run_dir, results)
    print(f"run directory: {run_dir}")
    return 0
