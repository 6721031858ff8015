"""`strata prepare RECIPE`: tokenize every source into shards (incremental; SLURM arrays split the work).

With `--num-shards N` > 1 the input files of every source are split among the N tasks
(pipeline/data/parts.py); the last task to finish a source, or `--finalize`, writes its manifest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO

from pipeline.errors import StrataError

LOCK_FILE = "prepare.lock"  # in the data dir (files.lock_folder)
HELP = "tokenize every source into shards (incremental)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--shard-index", type=int, default=0, help="this task's index in a SLURM array")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="tasks in the SLURM array (the input files of every source are split among them)")
    parser.add_argument("--finalize", action="store_true",
                        help="write the manifest of every source whose parts are all prepared (after an array "
                             "whose finalizing task died)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pipeline.commands.recipe_file import open_recipe
    from pipeline.data.shards import (
        prepare_source,
        prepared_manifests,
        small_heldout_sets,
        source_folder,
        source_tokenizers,
    )
    from pipeline.data.tokenizer import load_tokenizer

    if not 0 <= args.shard_index < args.num_shards:
        raise StrataError(f"--shard-index must be in [0, {args.num_shards}), got {args.shard_index}")
    recipe = open_recipe(args.recipe)
    lock = own_data_dir(recipe.data_dir, exclusive=args.num_shards == 1 or args.finalize)  # noqa: F841 (held)
    # One unit of work per (source, tokenizer): a stage's `tokenizer:` needs every source again.
    needed = source_tokenizers(recipe)
    units = [(src, tok) for src in sorted(recipe.all_sources(), key=lambda s: s.name) for tok in needed[src.name]]
    if args.num_shards > 1 or args.finalize:
        return prepare_parts(args, recipe, units)
    mine = [u for k, u in enumerate(units) if k % args.num_shards == args.shard_index]
    tokenizers = {tok: load_tokenizer(tok) for _, tok in mine}
    several = len(recipe.tokenizers()) > 1
    print(f"preparing {len(mine)} of {len(units)} source(s){' x tokenizer' if several else ''} into "
          f"{recipe.data_dir} with {args.workers} worker(s)")
    skipped_any = False
    for src, tok in mine:
        r = prepare_source(src, recipe, tokenizers[tok], workers=args.workers, progress=not args.quiet)
        state = "up to date" if r.skipped_up_to_date else "prepared"
        label = source_folder(recipe, src.name, tokenizers[tok]).name if several else r.source
        print(f"  {label:<20} {state:<11} {r.documents:>9,} docs {r.tokens:>13,} tokens  "
              f"{r.skipped_records} record(s) skipped")
        if r.skipped_records and not r.skipped_up_to_date:
            skipped_any = True
            for line in r.summary.splitlines():
                print(f"    {line}", file=sys.stderr)
    if skipped_any:
        print("warning: some records were skipped (see above); `on_error: fail` makes them fatal", file=sys.stderr)
    if len(mine) == len(units):  # every source prepared here: their held-out sets are known
        for warning in small_heldout_sets(recipe, prepared_manifests(recipe)):
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def own_data_dir(data_dir: Path, exclusive: bool) -> IO[str]:
    """The data dir's lock, held until the process ends: a plain prepare (or `--finalize`) alone,
    the tasks of one SLURM array together (each writes only its own parts). An exclusive owner
    first removes what killed prepares left: `.tmp-SOURCE-PID` folders, `.NAME.tmp-PID` files."""
    from pipeline.files import ATOMIC_LEFTOVER, SOURCE_LEFTOVER, lock_folder, remove_leftovers

    lock = lock_folder(data_dir / LOCK_FILE, exclusive, "in use by another strata prepare; wait for it to finish "
                       "or stop it (a data dir takes one prepare, or the tasks of one array, at a time)")
    if exclusive:
        for name in remove_leftovers(data_dir, (ATOMIC_LEFTOVER, SOURCE_LEFTOVER)):
            print(f"removed {data_dir / name} (left by a killed prepare)")
    return lock


def prepare_parts(args: argparse.Namespace, recipe, units: list) -> int:
    """This task's parts (every N-th input file over all sources), then the sources it can finalize."""
    from pipeline.data.parts import SourceParts
    from pipeline.data.shards import up_to_date
    from pipeline.data.tokenizer import load_tokenizer

    tokenizers = {tok: load_tokenizer(tok) for _, tok in units}
    # Which task does which part depends only on the recipe, never on what is prepared already.
    every = [SourceParts(src, recipe, tokenizers[tok]) for src, tok in units]
    parts = [(sp, i) for sp in every for i in range(len(sp.inputs))]
    todo = [sp for sp in every if up_to_date(sp.source, recipe, sp.tokenizer) is None]
    mine = [(sp, i) for k, (sp, i) in enumerate(parts) if k % args.num_shards == args.shard_index and sp in todo]
    if args.finalize:
        mine = []
    else:
        print(f"task {args.shard_index} of {args.num_shards}: {len(mine)} of {len(parts)} input file(s) of "
              f"{len(every)} source(s) ({len(every) - len(todo)} up to date), into {recipe.data_dir}")
    for sp, i in mine:
        state = "prepared" if sp.prepare(i, args.workers, progress=not args.quiet) else "already prepared"
        print(f"  {sp.out.name:<20} part {i:>5} {state:<16} {sp.inputs[i]}")
    waiting = []
    for sp in todo:
        manifest = sp.try_finalize(force=args.finalize)
        if manifest is not None:
            print(f"  {sp.out.name:<20} finalized {manifest['documents']:>9,} docs {manifest['tokens']:>13,} tokens  "
                  f"{manifest['skipped_total']} record(s) skipped")
        elif sp.missing():
            waiting.append(f"{sp.out.name} ({len(sp.missing())} of {len(sp.inputs)} parts missing)")
        else:
            print(f"  {sp.out.name:<20} complete; another task holds {sp.folder}/finalize.lock (if it died: "
                  f"strata prepare {recipe.file} --finalize)")
    if waiting:
        print("not yet complete (the last task to finish writes the manifest): " + ", ".join(waiting))
        if args.finalize:
            raise StrataError(f"{recipe.file}: cannot finalize, parts missing: {', '.join(waiting)}; run the "
                              f"array's tasks again")
    return 0
