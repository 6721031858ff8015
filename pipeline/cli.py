"""`strata COMMAND` (also `python -m pipeline COMMAND`): the parser and the table of commands.

Each command is a module of pipeline/commands/ with `HELP`, `add_arguments(parser)` and
`run(args) -> exit code`. User errors (StrataError) are printed as one line (or one line per
recipe problem) and turned into a non-zero exit code; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

from pipeline.commands import (
    check,
    eval,
    expand,
    generate,
    merge,
    prepare,
    report,
    schema,
    score,
    sweep,
    tokenizer,
    train,
)
from pipeline.commands.launch import record_exit
from pipeline.data.progress import silence_library_bars
from pipeline.errors import StrataError

COMMANDS = {  # name -> module, in the order `strata --help` lists them
    "check": check,
    "schema": schema,
    "prepare": prepare,
    "train": train,
    "score": score,
    "generate": generate,
    "sweep": sweep,
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
    code = run_command(argv)
    record_exit(code)  # a worker of `strata train --nproc-per-node`: its code for the launcher
    return code


def run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    silence_library_bars()  # off a terminal: no \r frames from transformers, lm-eval, datasets
    try:
        with quiet_third_party_warnings():
            return args.func(args)
    except StrataError as e:
        if args.debug:
            raise
        report(f"error: {e}", every_rank=e.every_rank)
        return e.exit_code
    except OSError as e:  # a read-only or full disk, a missing or unreadable file: one line naming it
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        report(f"error: {where}{e.strerror or e} (run with --debug for the traceback)", every_rank=False)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def report(line: str, every_rank: bool) -> None:
    """Print a user error whole, with its newline, in one write (lines of several ranks never glue
    together). An error every rank raises the same way (`StrataError.every_rank`: the recipe, the
    run folder, the batch arithmetic) is printed by rank 0 alone; any other is printed by the
    rank that raised it, prefixed with it, so that an error on one rank alone is never lost."""
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0 and every_rank:
        return  # (record_exit holds this rank's exit until rank 0 has printed)
    prefix = f"[rank {rank}] " if rank != 0 else ""
    sys.stderr.write(prefix + line + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def quiet_third_party_warnings() -> Iterator[None]:
    """Silence known deprecation warnings that libraries we call emit on every step (DeepSpeed's use
    of torch.distributed.all_gather_into_tensor / reduce_scatter_tensor under ZeRO) and the
    FutureWarnings of the Hugging Face libraries (transformers' `is_gradient_checkpointing`, at
    every stage: a note to library authors, nothing a recipe can change), set once for the whole
    command, in Strata's commands only: a user's own code importing `pipeline` still sees them."""
    with warnings.catch_warnings():
        for pattern in KNOWN_THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
            warnings.filterwarnings("ignore", message=pattern, category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module=HUGGING_FACE_MODULES)
        yield


KNOWN_THIRD_PARTY_WARNINGS = (  # regexes matched at the start of the message
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
)

HUGGING_FACE_MODULES = r"(transformers|peft|datasets|huggingface_hub|accelerate|lm_eval)(\.|$)"


if __name__ == "__main__":
    sys.exit(main())
