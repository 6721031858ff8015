"""`strata report RUN_DIR`: report.md and PNG plots of a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "report.md and PNG plots of a run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluate.report import write_report

    out, notes = write_report(Path(args.run_dir))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(out)
    return 0
