"""`strata train RECIPE [--run-dir DIR] [--dry-run]`: run or resume every stage of a recipe."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.commands.dry_run import dry_run
from pipeline.commands.launch import add_launch_arguments, launch
from pipeline.commands.recipe_file import open_recipe, recipe_plan
from pipeline.errors import RecipeError
from pipeline.train.run_folder import export_dir

HELP = "run (or resume) all stages"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe")
    parser.add_argument("--run-dir", help="run folder (default runs/<recipe name>)")
    parser.add_argument("--dry-run", action="store_true",
                   help="print world size, batch arithmetic, steps per stage and the DeepSpeed config; train nothing")
    parser.add_argument("--world-size", type=int, help="with --dry-run: plan for this many ranks (default: WORLD_SIZE or 1)")
    add_launch_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return dry_run(args)
    if args.nproc_per_node and "TORCHELASTIC_RUN_ID" not in os.environ:  # the launcher, not a worker
        open_recipe(args.recipe)  # a bad recipe: one line here, before any worker starts
        return launch(args)
    return train(args)


def train(args: argparse.Namespace) -> int:
    """Run or resume every stage of the recipe (one process, or one rank under torchrun)."""
    from pipeline.evaluate.harness import TaskEvaluation, recipe_tasks, refuse_unloadable_tasks
    from pipeline.evaluate.heldout import RunEvaluation
    from pipeline.model.skeleton import refuse_unmatched_names
    from pipeline.train.failures import Interrupted
    from pipeline.train.trainer import Trainer, open_training

    recipe = open_recipe(args.recipe)
    refused = recipe_plan(recipe).problems.errors  # what `strata check` refuses, with the same lines
    if refused:
        raise RecipeError(recipe.file, refused)
    run_dir = Path(args.run_dir) if getattr(args, "run_dir", None) else Path("runs") / recipe.name
    if recipe.evaluation.tasks:  # a task that cannot load is refused before training, not after a stage
        refuse_unloadable_tasks(recipe)
    refuse_unmatched_names(recipe)  # a misspelt adapter target in stage 3 is refused now, not after stage 2

    def evaluation(t: Trainer) -> RunEvaluation | TaskEvaluation:  # before and after every stage
        heldout = RunEvaluation(t.recipe, t.run_dir, t.dist.device, t.dtype, sinks=t.sinks)
        return TaskEvaluation(heldout, recipe_tasks(t.recipe)) if t.recipe.evaluation.tasks else heldout

    with open_training(recipe, run_dir) as run:  # lock, launcher watch, process group
        trainer = Trainer(recipe, run_dir, run, evaluation=evaluation)
        try:
            losses = trainer.train()
        except Interrupted as stop:  # SIGTERM/SIGUSR1: checkpoint written, resumable
            if trainer.is_main:
                print(stop, flush=True)
            return stop.exit_code
        finally:
            trainer.close()
    if trainer.is_main:
        print(f"\nrun folder: {run_dir}")
        print(f"{'stage':<24} {'final loss':>10}  export")
        for i, stage in enumerate(recipe.stages):
            loss = losses.get(stage.name)
            hf = export_dir(run_dir, i, stage.name)
            print(f"{stage.name:<24} {loss if loss is None else f'{loss:.4f}':>10}  {hf}")
    return 0

