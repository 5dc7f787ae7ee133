"""What the training commands share (train, sft, rm, dpo, pipeline): arguments, config resolution, errors.
(Not a subcommand: the CLI skips modules whose name starts with "_".)

Each command is ``run_trainer(args, command, summary)``: run ``postrl.api.run_command(command, CONFIG,
*overrides, resume=...)`` (the Python API resolves the config exactly as documented there: default recipe,
a leading ``key=value``, the run's own ``config.yaml`` on ``--resume``), turn bad input into exit code 2 with
one message, Ctrl-C into 130, and print the command's summary followed by ``run directory: <path>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable



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


def run_trainer(args: argparse.Namespace, command: str, summary: Callable[[Path, dict[str, Any]], None]) -> int:
    from postrl.api import run_command
    from postrl.run.errors import TrainingError

    try:
        result = run_command(command, args.config, *args.overrides, resume=args.resume)
    except (ValueError, RuntimeError, OSError) as exc:
        if report_input_error(exc, (TrainingError,)):
            return 2
        raise
    if result.results.get("interrupted"):
        return 130
    from postrl.run.distributed import launched_rank

    if launched_rank() != 0:  # torchrun: rank 0 prints the summary and writes the report
        return 0
    summary(result.run_dir, result.results)
    print(f"run directory: {result.run_dir}")
    return 0
