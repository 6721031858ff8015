"""`strata prepare RECIPE`: tokenize every source into shards (incremental; SLURM arrays split the work)."""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import StrataError

HELP = "tokenize every source into shards (incremental)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--shard-index", type=int, default=0, help="this task's index in a SLURM array")
    parser.add_argument("--num-shards", type=int, default=1, help="tasks in the SLURM array (sources are split among them)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pipeline.commands.recipe_file import open_recipe
    from pipeline.data.shards import prepare_source, source_folder, source_tokenizers
    from pipeline.data.tokenizer import load_tokenizer

    if not 0 <= args.shard_index < args.num_shards:
        raise StrataError(f"--shard-index must be in [0, {args.num_shards}), got {args.shard_index}")
    recipe = open_recipe(args.recipe)
    # One unit of work per (source, tokenizer): a stage's `tokenizer:` needs every source again.
    needed = source_tokenizers(recipe)
    units = [(src, tok) for src in sorted(recipe.all_sources(), key=lambda s: s.name) for tok in needed[src.name]]
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
    return 0
