"""`strata schema [--out FILE]`: the recipe's JSON Schema, for editors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "write the recipe's JSON Schema"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="file to write (default: stdout)")


def run(args: argparse.Namespace) -> int:
    from pipeline.recipe.load import recipe_schema

    text = json.dumps(recipe_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0
