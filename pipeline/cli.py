"""`strata COMMAND` (also `python -m pipeline COMMAND`): the parser and the table of commands.

Each command is a module of pipeline/commands/ with `HELP`, `add_arguments(parser)` and
`run(args) -> exit code`. User errors (StrataError) are printed as one line (or one line per
recipe problem) and turned into a non-zero exit code; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.commands import check, eval, expand, merge, prepare, report, schema, score, tokenizer, train
from pipeline.errors import StrataError

COMMANDS = {  # name -> module, in the order `strata --help` lists them
    "check": check,
    "schema": schema,
    "prepare": prepare,
    "train": train,
    "score": score,
    "eval": eval,
    "report": report,
    "tokenizer": tokenizer,
    "expand": expand,
    "merge": merge,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Continual pretraining, stage by stage.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.HELP)
        if hasattr(command, "run"):
            p.set_defaults(func=command.run)
        command.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StrataError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
