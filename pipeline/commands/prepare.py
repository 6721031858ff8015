"""`strata prepare RECIPE`: tokenize every source into shards (incremental; SLURM arrays split the work).

With `--num-shards N` > 1 the input files of every source are split among the N tasks
(pipeline/data/parts.py); the last task to finish a source, or `--finalize`, writes its manifest.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import sys
from collections.abc import Iterator
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

    if not 0 <= args.shard_index < args.num_shards:
        raise StrataError(f"--shard-index must be in [0, {args.num_shards}), got {args.shard_index}")
    recipe = open_recipe(args.recipe)
    with own_data_dir(recipe.data_dir, exclusive=args.num_shards == 1 or args.finalize):  # released on return
        return prepare_recipe(args, recipe)


def prepare_recipe(args: argparse.Namespace, recipe) -> int:
    """Every source of the recipe (or this array task's share), the data dir's lock held."""
    from pipeline.data.shards import (
        prepare_source,
        prepared_manifests,
        small_heldout_sets,
        source_folder,
        source_tokenizers,
    )
    from pipeline.data.tokenizer import load_tokenizer

    # One unit of work per (source, tokenizer): a stage's `tokenizer:` needs every source again.
    needed = source_tokenizers(recipe)
    units = [(src, tok) for src in sorted(recipe.all_sources(), key=lambda s: s.name) for tok in needed[src.name]]
    if args.num_shards > 1 or args.finalize or recipe.data.dedup is not None or files_in_parallel(args, units):
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
    """The data dir's lock, held until it is closed: a plain prepare (or `--finalize`) alone,
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
    """This task's parts (every N-th input file over all sources), then the sources it can finalize.

    With data.dedup every task first signs its share of the training sources' parts; the sources
    are finalized (their duplicates left out) once every part is signed and tokenized."""
    from pipeline.data.parts import SourceParts
    from pipeline.data.tokenizer import load_tokenizer

    tokenizers = {tok: load_tokenizer(tok) for _, tok in units}
    # Which task does which part depends only on the recipe, never on what is prepared already.
    every = [SourceParts(src, recipe, tokenizers[tok]) for src, tok in units]
    parts = [(sp, i) for sp in every for i in range(len(sp.inputs))]
    dedup = Deduplication(recipe, args) if recipe.data.dedup is not None else None
    todo = [sp for sp in every if stale(sp, dedup)]
    mine = [(sp, i) for k, (sp, i) in enumerate(parts) if k % args.num_shards == args.shard_index and sp in todo]
    if args.finalize:
        mine = []
    else:
        print(f"task {args.shard_index} of {args.num_shards}: {len(mine)} of {len(parts)} input file(s) of "
              f"{len(every)} source(s) ({len(every) - len(todo)} up to date), into {recipe.data_dir}")
    # With --workers, whole input files are read and tokenized in parallel, one per worker process.
    inner = args.workers if len(mine) <= 1 else 1  # one file: its tokenizing spread over the workers instead
    calls = [functools.partial(sp.prepare, i, inner, not args.quiet and args.workers <= 1) for sp, i in mine]
    for (sp, i), done in zip(mine, in_parallel(calls, args.workers)):
        print(f"  {sp.out.name:<20} part {i:>5} {'prepared' if done else 'already prepared':<16} {sp.inputs[i]}")
    waiting = [w for sp in todo if (w := finalize(sp, args, recipe, dedup))]
    if waiting:
        print("not yet complete (the last task to finish writes the manifest): " + ", ".join(waiting))
        if args.finalize:
            raise StrataError(f"{recipe.file}: cannot finalize, parts missing: {', '.join(waiting)}; run the "
                              f"array's tasks again")
    return 0


_CALLS: list = []  # what the forked workers of in_parallel run, by index


def _call(k: int):
    return _CALLS[k]()


def in_parallel(calls: list, workers: int) -> Iterator:
    """The results of `calls` in order, run by `workers` forked processes (in this one when 1)."""
    global _CALLS
    if workers <= 1 or len(calls) <= 1:
        yield from (call() for call in calls)
        return
    _CALLS = calls
    try:
        with mp.get_context("fork").Pool(min(workers, len(calls))) as pool:
            yield from pool.imap(_call, range(len(calls)))
    finally:
        _CALLS = []


def files_in_parallel(args: argparse.Namespace, units: list) -> bool:
    """Whether --workers should read whole input files in parallel (some source has several): then
    reading, not only tokenizing, is spread over the workers, as the parts of an array are."""
    from pipeline.data.sources import part_inputs

    return args.workers > 1 and any(len(part_inputs(src)) > 1 for src, _ in units)


def stale(sp, dedup: Deduplication | None) -> bool:
    """Whether a (source, tokenizer) must be prepared: its key changed, or (once every part is signed)
    what deduplication drops from it did."""
    from pipeline.data.shards import up_to_date

    manifest = up_to_date(sp.source, sp.recipe, sp.tokenizer)
    if manifest is None:
        return True
    removed = dedup.removed(sp.source.name) if dedup is not None else None
    return removed is not None and manifest.get("dedup", {}).get("digest") != removed.digest()


def finalize(sp, args: argparse.Namespace, recipe, dedup: Deduplication | None) -> str | None:
    """Finalize one (source, tokenizer) if it can be; what it waits for, or None."""
    if dedup is not None and sp.source.name in dedup.rules and not dedup.complete():
        return f"{sp.out.name} (deduplication: {len(dedup.missing)} part signature(s) missing)"
    removed = dedup.removed(sp.source.name) if dedup is not None else None
    manifest = sp.try_finalize(force=args.finalize, removed=removed)
    if manifest is not None:
        print(f"  {sp.out.name:<20} finalized {manifest['documents']:>9,} docs {manifest['tokens']:>13,} tokens  "
              f"{manifest['skipped_total']} record(s) skipped")
        if "dedup" in manifest:
            print(f"    {dedup_line(manifest['dedup'])}")
    elif sp.missing():
        return f"{sp.out.name} ({len(sp.missing())} of {len(sp.inputs)} parts missing)"
    else:
        print(f"  {sp.out.name:<20} complete; another task holds {sp.folder}/finalize.lock (if it died: "
              f"strata prepare {recipe.file} --finalize)")
    return None


def dedup_line(d: dict) -> str:
    """One line of a manifest's deduplication counts (also printed by strata check)."""
    against = ", ".join(f"{k}: {v:,}" for k, v in d["against"].items())
    return (f"dedup: {d['exact']:,} exact + {d['near']:,} near duplicate(s) removed"
            + (f" (kept copy in {against})" if against else "")
            + f"; {d['heldout_near_train']:,} held-out doc(s) removed as near a training doc")


class Deduplication:
    """This task's share of the signatures, and the plan once every part is signed (computed once)."""

    def __init__(self, recipe, args: argparse.Namespace):
        from pipeline.data.dedup import all_parts, missing_signatures, rules, sign_part

        self.recipe, self.rules = recipe, rules(recipe)
        self._plan: dict | None = None
        if not args.finalize:
            shared = all_parts(recipe)
            mine = [(src, i) for k, (src, i) in enumerate(shared) if k % args.num_shards == args.shard_index]
            signed = sum(in_parallel([functools.partial(sign_part, recipe, src, i) for src, i in mine], args.workers))
            print(f"deduplication: signed {signed} of this task's {len(mine)} of {len(shared)} training part(s)")
        self.missing = missing_signatures(recipe)

    def complete(self) -> bool:
        from pipeline.data.dedup import missing_signatures

        if self.missing:
            self.missing = missing_signatures(self.recipe)  # other tasks may have signed theirs since
        return not self.missing

    def removed(self, name: str):
        """What the plan drops from source `name` (None: not deduplicated, or not every part signed yet)."""
        from pipeline.data.dedup import load_signatures, plan_dedup

        if name not in self.rules or not self.complete():
            return None
        if self._plan is None:
            self._plan = plan_dedup(self.recipe, load_signatures(self.recipe))
        return self._plan[name]
