"""`strata eval RUN_DIR`: held-out loss per domain for each finished stage that lacks it."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.recipe_file import open_run_recipe

HELP = "held-out loss per domain for each finished stage that lacks it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--reference", help="from-scratch reference for FWD: an eval.json or {measure: {domain: value}}")


def run(args: argparse.Namespace) -> int:
    """Evaluate what the run's eval.json lacks (one process, or every rank under torchrun)."""
    import torch.distributed as dist

    from pipeline.distributed import compute_dtype, join
    from pipeline.evaluate.heldout import EVAL_JSON, INIT, RunEvaluation, read_reference

    run_dir = Path(args.run_dir)
    recipe = open_run_recipe(run_dir)  # works from any directory; prepared shards suffice
    device = join().device
    evaluation = RunEvaluation(recipe, run_dir, device, compute_dtype(recipe.train.dtype, device))
    if getattr(args, "reference", None):
        evaluation.file.reference = read_reference(Path(args.reference))
    ran = evaluation.fill_in()
    if evaluation.rank == 0:
        if evaluation.domains and (ran or evaluation.file.reference is not None):
            evaluation.file.write(recipe, evaluation.domains)
        done = [INIT] + [recipe.stages[i].name for i in evaluation.finished_stages()]
        print(f"evaluated: {', '.join(ran) if ran else 'nothing new'} "
              f"(finished: {', '.join(done)}); {run_dir / EVAL_JSON}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0

