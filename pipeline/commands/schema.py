"""`strata schema [--markdown] [--out FILE]`: the recipe's JSON Schema, for editors, or its
Markdown key reference, for docs/recipe.md. Both are generated from the recipe dataclasses."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "write the recipe's JSON Schema (or, with --markdown, its key reference)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="file to write (default: stdout); with --markdown, a page holding the "
                                      "generated-section markers has only that section rewritten")
    parser.add_argument("--markdown", action="store_true",
                        help="the key reference as Markdown tables (docs/recipe.md) instead of JSON Schema")


def run(args: argparse.Namespace) -> int:
    from pipeline.recipe.load import recipe_schema
    from pipeline.recipe.reference import BEGIN, reference_markdown, with_reference

    if not args.markdown:
        text = json.dumps(recipe_schema(), indent=2) + "\n"
    elif args.out and Path(args.out).is_file() and BEGIN in Path(args.out).read_text():
        text = with_reference(Path(args.out).read_text(), args.out)
    else:
        text = reference_markdown()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0
