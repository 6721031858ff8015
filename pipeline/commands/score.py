"""`strata score RECIPE --stage NAME`: RHO-1 reference losses precomputed into the run folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.recipe_file import open_recipe

HELP = "RHO-1: precompute the reference model's token losses for a stage"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe")
    parser.add_argument("--stage", required=True, help="the stage whose selection is scored")
    parser.add_argument("--run-dir", help="run folder holding a reference stage's export (default runs/<recipe name>)")
    parser.add_argument("--block-steps", type=int, default=None, help="optimizer steps per score file (default: ~16M tokens)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pipeline.train.scoring import score_stage

    recipe = open_recipe(args.recipe)
    run_dir = Path(args.run_dir) if getattr(args, "run_dir", None) else Path("runs") / recipe.name
    score_stage(recipe, args.stage, run_dir, block_steps=args.block_steps, progress=not args.quiet)
    return 0

