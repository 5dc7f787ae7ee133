"""``postrl report RUN_DIR [--eval EVAL_JSON] [--out FILE]``: a self-contained HTML report of a run."""

from __future__ import annotations

import argparse
import sys

HELP = "write RUN_DIR/report.html (plots, eval tables, sample completions, config) and RUN_DIR/plots/*.png"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `postrl train`")
    p.add_argument("--eval", dest="eval_path", metavar="PATH",
                   help="eval.json from `postrl eval` (or its directory) for the pass@k section; "
                        "default: RUN_DIR/eval.json or RUN_DIR/eval/eval.json when present")
    p.add_argument("--out", metavar="FILE", help="where to write the HTML (default: RUN_DIR/report.html)")


def run(args: argparse.Namespace) -> int:
    from postrl.eval.report import ReportError, build_report

    try:
        path = build_report(args.run_dir, eval_path=args.eval_path, out=args.out)
    except ReportError as exc:
        print(f"postrl: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0
