"""`strata train RECIPE --dry-run`: the launch arithmetic, checked, without building an engine.

Prints what a real launch would use -- world size, micro batch, gradient accumulation, steps and
warmup per stage, the DeepSpeed config as JSON -- so a cluster job can be sanity-checked on a
login node in a second. The world size is `--world-size`, else torchrun's WORLD_SIZE, else 1.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def resolved_world_size(requested: int | None) -> tuple[int, str]:
    if requested is not None:
        return requested, "--world-size"
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]), "WORLD_SIZE"
    return 1, "one process (no WORLD_SIZE; set --world-size N to plan a launch)"


def dry_run(args: Any) -> int:
    import torch

    from pipeline.commands.recipe_file import open_recipe
    from pipeline.data.shards import prepared_tokens
    from pipeline.distributed import compute_dtype
    from pipeline.errors import StrataError
    from pipeline.recipe.plan import build_plan, tokens_per_step
    from pipeline.train.trainer import deepspeed_config

    recipe = open_recipe(args.recipe)
    world_size, origin = resolved_world_size(getattr(args, "world_size", None))
    if world_size < 1:
        raise StrataError(f"--world-size must be >= 1, got {world_size}")
    gpu = torch.cuda.is_available()
    bf16 = compute_dtype(recipe.train.dtype, torch.device("cuda" if gpu else "cpu")) == torch.bfloat16
    config = deepspeed_config(recipe, world_size, bf16)  # refuses a global batch that does not divide
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun: one copy of the report is enough
    plans = build_plan(recipe, prepared_tokens(recipe))
    step_tokens = tokens_per_step(recipe)
    print(f"dry run of {recipe.file} (nothing is trained, no engine is built)")
    print(f"world size        {world_size} ({origin})")
    print(f"micro batch       {recipe.batch.micro} sequences per rank")
    print(f"accumulation      {config['gradient_accumulation_steps']} micro-batch(es) per optimizer step")
    print(f"global batch      {recipe.batch.global_} sequences x {recipe.seq_len} tokens = {step_tokens:,} tokens/step")
    print(f"precision         {'bf16' if bf16 else 'fp32'} on {'GPU' if gpu else 'CPU'}, ZeRO stage "
          f"{config['zero_optimization']['stage']}")
    for plan in plans:
        if plan.steps is None:
            steps = "steps unknown (run strata prepare to size the stage)"
        else:
            steps = f"{plan.steps:,} steps (warmup {plan.warmup_steps}), {plan.steps * step_tokens:,} tokens"
        print(f"stage {plan.index + 1} {plan.name!r:<20} {steps}")
    from pipeline.train.memory import memory_lines

    lines, warnings = memory_lines(recipe, world_size)
    for line in lines:
        print(line)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print("deepspeed config:")
    print(json.dumps(config, indent=2))
    return 0
