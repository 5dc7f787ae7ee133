"""``postrl`` command line: one subcommand per module in :mod:`postrl.commands`.

``postrl train [CONFIG.yaml] [key.sub=value ...] [--resume RUN_DIR]`` and the
other commands listed by ``postrl --help``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import postrl.commands

RECIPES = importlib.import_module("postrl.commands.train").RECIPES
CONFIG_EPILOG = ("CONFIG is a YAML recipe (recipes/*.yaml); every key, its type, default and valid values: "
                 "docs/configuration.md. Override any key as section.key=value, e.g. train.lr=1e-5.")
ORDER = ["train", "eval", "report", "sft", "rm", "dpo", "pipeline", "bench"]  # help listing order


def _commands() -> dict:
    names = [m.name for m in pkgutil.iter_modules(postrl.commands.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return {n: importlib.import_module(f"postrl.commands.{n}") for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="postrl", description="Reinforcement-learning post-training of LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = _commands()
    for name, mod in modules.items():
        epilog = (CONFIG_EPILOG if getattr(mod, "ACCEPTS_OVERRIDES", False) else None)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=epilog)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    # parse_known_args + re-check: argparse cannot put positionals after an option into `overrides`
    # (`postrl train CONFIG --resume DIR train.steps=N`, as the Ctrl-C message suggests), so for
    # commands that take overrides, key=value words left over are taken as overrides; anything
    # else is still an error.
    args, extra = parser.parse_known_args(argv)
    takes_overrides = getattr(modules[args.command], "ACCEPTS_OVERRIDES", False)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not takes_overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="[%(levelname)s %(name)s] %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars would bury postrl's own progress
    try:
        return args.func(args)
    except (OSError, ValueError) as exc:  # bad input that no command-specific check caught: a message, not a traceback
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"postrl: error: {type(exc).__name__}{where}: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("postrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
