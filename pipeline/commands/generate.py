"""`strata generate RECIPE --stage NAME`: only the generation of a stage's generative replay.

The same step `strata train` runs before such a stage (pipeline/train/generation.py), on its own,
e.g. as a SLURM job of its own or under torchrun to split the blocks over GPUs. Resumable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.recipe_file import open_recipe
from pipeline.errors import StrataError

HELP = "generative replay: write a stage's generated replay text"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe")
    parser.add_argument("--stage", required=True, help="the stage whose replay.generate is run")
    parser.add_argument("--run-dir", help="run folder holding the generating stage's export (default runs/<recipe name>)")


def run(args: argparse.Namespace) -> int:
    from pipeline.distributed import join
    from pipeline.train.generation import ensure_generated

    recipe = open_recipe(args.recipe)
    names = [s.name for s in recipe.stages]
    if args.stage not in names:
        raise StrataError(f"{recipe.file}: no stage named {args.stage!r} (stages: {', '.join(names)})")
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / recipe.name
    manifest = ensure_generated(recipe, names.index(args.stage), run_dir)
    if join().rank == 0:
        print(f"generated replay of stage {args.stage!r}: {manifest['documents']:,} samples, "
              f"{manifest['tokens']:,} tokens ({manifest['empty']:,} empty) in {recipe.data_dir / manifest['source']}")
    return 0
