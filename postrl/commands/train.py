"""``postrl train [CONFIG.yaml] [key.sub=value ...] [--resume RUN_DIR]``: RL training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "RL training (GRPO family); no CONFIG runs recipes/quickstart.yaml"
ACCEPTS_OVERRIDES = True  # key=value words after options are taken as dotted overrides

RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # also reachable as ./recipes in a checkout


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
    from postrl.config import ConfigError, load_config
    from postrl.trainer import TrainingError, train

    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `postrl train key=value` with the default recipe
        config = None
    if config is None and args.resume:
        saved = Path(args.resume) / "config.yaml"
        config = str(saved) if saved.is_file() else None
    path = Path(config) if config else _default_recipe()
    try:
        cfg = load_config(path, overrides)
        run_dir, results = train(cfg, resume=args.resume)
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
    _print_table(results)
    _write_report(run_dir)
    print(f"run directory: {run_dir}")
    return 0


def _write_report(run_dir: Path) -> None:
    """The run's HTML report (postrl report); a failure warns and never fails the finished training."""
    try:
        from postrl.eval.report import build_report

        print(f"report: {build_report(run_dir)}")
    except Exception as exc:  # noqa: BLE001 - the model and metrics are saved; the report can be redone later
        print(f"postrl: warning: could not write the report ({type(exc).__name__}: {exc}); "
              f"retry with: postrl report {run_dir}", file=sys.stderr)




def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (recipe); default: the quickstart recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 rollout.n=4")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
