"""`strata eval RUN_DIR [--tasks ...]`: held-out loss per domain, and downstream tasks, for each
finished stage (and the initial model) that lacks them."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.recipe_file import open_run_recipe
from pipeline.errors import StrataError
from pipeline.recipe.load import evaluation_problems

HELP = "held-out loss per domain (and downstream tasks) for each finished stage that lacks them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--reference", help="from-scratch reference for FWD: an eval.json or {measure: {domain: value}}")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="lm-evaluation-harness tasks (names or local task YAMLs) instead of the recipe's evaluation.tasks")
    parser.add_argument("--num-fewshot", type=int, help="instead of the recipe's evaluation.num_fewshot")
    parser.add_argument("--limit", type=float, help="examples per task (a count, or a fraction < 1)")
    parser.add_argument("--batch-size", help="the harness's batch size (a number or auto)")


def run(args: argparse.Namespace) -> int:
    """Evaluate what the run's eval.json lacks (one process, or every rank under torchrun)."""
    from pipeline.distributed import compute_dtype, join, leave
    from pipeline.evaluate.harness import TaskEvaluation, recipe_tasks, refuse_unloadable_tasks
    from pipeline.evaluate.heldout import EVAL_JSON, INIT, RunEvaluation, read_reference

    run_dir = Path(args.run_dir)
    recipe = open_run_recipe(run_dir)  # works from any directory; prepared shards suffice
    _override_tasks(recipe, args)
    if recipe.evaluation.tasks:  # --tasks may leave out tasks the recipe's stage map names
        refuse_unloadable_tasks(recipe, stage_keys=not getattr(args, "tasks", None))
    device = join().device
    evaluation = RunEvaluation(recipe, run_dir, device, compute_dtype(recipe.train.dtype, device))
    if getattr(args, "reference", None):
        evaluation.file.set_reference(read_reference(Path(args.reference)))
    tasks = TaskEvaluation(evaluation, recipe_tasks(recipe)) if recipe.evaluation.tasks else None
    ran = tasks.fill_in() if tasks else evaluation.fill_in()
    if evaluation.rank == 0:
        if evaluation.domains and (ran or evaluation.file.reference is not None):
            evaluation.file.write(recipe, evaluation.domains)
        done = [INIT] + [recipe.stages[i].name for i in evaluation.finished_stages()]
        print(f"evaluated: {', '.join(ran) if ran else 'nothing new'} "
              f"(finished: {', '.join(done)}); {run_dir / EVAL_JSON}")
    leave()
    return 0


def _override_tasks(recipe, args: argparse.Namespace) -> None:
    """--tasks and its options replace the recipe's evaluation block (task files as given, checked)."""
    ev = recipe.evaluation
    if getattr(args, "tasks", None):
        missing = [t for t in args.tasks if t.endswith((".yaml", ".yml")) and not Path(t).is_file()]
        if missing:
            raise StrataError(f"--tasks: task file not found: {missing[0]}")
        ev.tasks = list(args.tasks)
    if getattr(args, "num_fewshot", None) is not None:
        ev.num_fewshot = args.num_fewshot
    if getattr(args, "limit", None) is not None:
        ev.limit = args.limit
    if getattr(args, "batch_size", None) is not None:
        ev.batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    for key, problem in evaluation_problems(ev):  # the recipe's rules for the options that override it
        raise StrataError(f"--{key.replace('_', '-')}: {problem}")
