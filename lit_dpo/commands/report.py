"""`lit_dpo report RUN_DIR ...`: the comparison table, CIs, McNemar and a PNG (`lit_dpo.rec.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "compare runs: each metric with a 95 percent bootstrap CI, McNemar on HR@1 (report.md, report.png)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories holding results.json")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: first run's parent)")


def run(args: argparse.Namespace) -> int:
    from lit_dpo.rec.report import build_report

    print(build_report(args.run_dirs, args.out))
    return 0
