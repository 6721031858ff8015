"""What one stage of a run is: built once by the trainer when the stage starts, then read everywhere.

Invariant: a `StageContext` is frozen, and every piece of a stage (the stream and its loader, the
objective, RHO-1's selection, the L2/EWC anchor, the stage-end merge, the frozen reference and
teacher models) takes it instead of its own list of recipe, index, rank, world size, device,
dtype, run folder and ZeRO config, so they cannot disagree about any of them. The walk from the
recipe to a training step reads one way down: recipe -> plan -> context -> stream, step, terms.

It lives in the data layer, the lowest layer that all of those pieces see (pipeline/train sits on
top of it); it holds the tokenizer in force, which the data layer loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.distributed import Dist
from pipeline.recipe.plan import StagePlan, build_plan
from pipeline.recipe.spec import Recipe, Stage


def one_process() -> Dist:
    """The distributed facts of a single process on the CPU (tests, scoring, benchmarks)."""
    return Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@dataclass(frozen=True)
class StageContext:
    """Stage `index` of `recipe` as it runs here: its plan, tokenizer, ranks, dtype and run folder."""

    recipe: Recipe
    index: int
    plan: StagePlan
    tokenizer: Any  # the tokenizer in force at this stage (recipe.tokenizer_at(index)), loaded
    dist: Dist = field(default_factory=one_process)
    dtype: torch.dtype = torch.float32  # the compute dtype (pipeline/distributed.py's compute_dtype)
    run_dir: Path = Path("runs")
    zero3_config: dict | None = None  # the DeepSpeed config when the student is partitioned (ZeRO-3)
    resume_from: str | None = None  # the checkpoint tag the stage starts from (None: the initial model)
    fresh: bool = True  # the stage starts (False: it resumes its own mid-stage checkpoint)

    @classmethod
    def single_process(cls, recipe: Recipe, index: int, plan: StagePlan | None = None) -> StageContext:
        """Stage `index` in one process on the CPU, planned from the prepared data unless `plan` is
        given (scoring, tools and tests; the trainer builds its contexts with every field)."""
        from pipeline.data.shards import prepared_tokens
        from pipeline.data.tokenizer import cached_tokenizer

        plan = plan or build_plan(recipe, prepared_tokens(recipe))[index]
        return cls(recipe, index, plan, cached_tokenizer(recipe.tokenizer_at(index)))

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[self.index]

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0
