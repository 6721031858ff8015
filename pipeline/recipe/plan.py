"""The plan: what each stage will do, in numbers (tokens, steps, mixture, passes, LR).

A plan is derived from the recipe and, when the data is prepared, from the shard manifests
(which know how many tokens each source holds). `strata check` prints it; the stream and the
trainer read their step counts and mixtures from it, so all three agree by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.errors import StrataError
from pipeline.recipe.generated import GENERATED, generated_source
from pipeline.recipe.schedule import warmup_steps
from pipeline.recipe.spec import Recipe


@dataclass(frozen=True)
class Component:
    """One entry of a stage's mixture: a source, and the share of the stage's tokens it supplies."""

    source: str
    share: float
    replay_of: str | None = None  # the earlier stage it is replayed from (GENERATED: text the model wrote); None: own
    resample: bool = False  # replayed by drawing again from the windows seen before, not reading on


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    tokens: int | None  # None: one pass over own sources, known only once prepared
    steps: int | None
    warmup_steps: int | None
    mixture: tuple[Component, ...]
    max_lr: float
    min_lr: float
    decay: str

    def passes(self, source_tokens: dict[str, int]) -> dict[str, float | None]:
        """Implied passes over each source: tokens it must supply / tokens it holds."""
        out: dict[str, float | None] = {}
        for c in self.mixture:
            held = source_tokens.get(c.source)
            out[c.source] = (self.tokens * c.share / held) if (held and self.tokens) else None
        return out


def stage_mixture(recipe: Recipe, index: int) -> tuple[Component, ...]:
    """Shares of tokens per source: own sources by weight, replay by the replayed sources' weights."""
    stage = recipe.stages[index]
    replay = stage.replay.ratio if stage.replay else 0.0
    own_total = sum(s.weight for s in stage.sources)
    mixture = [Component(s.name, (1 - replay) * s.weight / own_total) for s in stage.sources]
    if replay:
        old = recipe.replayed_sources(index)
        given = stage.replay.weights
        weight = {src.name: (given.get(src.name, 0.0) if given is not None else src.weight) for _, src in old}
        generated = (given or {}).get(GENERATED, 1.0) if stage.replay.generate is not None else 0.0
        old_total = sum(weight.values()) + generated
        mixture += [Component(src.name, replay * weight[src.name] / old_total, replay_of=name,
                              resample=stage.replay.mode == "resample")
                    for name, src in old if weight[src.name] > 0]
        if generated > 0:  # after the real replayed sources: the stream's `source` marks it replayed
            mixture.append(Component(generated_source(stage.name), replay * generated / old_total, replay_of=GENERATED))
    return tuple(mixture)


def build_plan(recipe: Recipe, source_tokens: dict[str, int] | None = None) -> list[StagePlan]:
    """Plan every stage. `source_tokens` (from the manifests) resolves stages without `tokens`."""
    source_tokens = source_tokens or {}
    step = tokens_per_step(recipe)
    plans = []
    for i, stage in enumerate(recipe.stages):
        mixture = stage_mixture(recipe, i)
        tokens = stage.tokens
        if tokens is None:
            own = [source_tokens.get(s.name) for s in stage.sources]
            if all(t is not None for t in own):
                replay = stage.replay.ratio if stage.replay else 0.0
                tokens = math.ceil(sum(own) / (1 - replay))
        steps = max(1, math.ceil(tokens / step)) if tokens else None
        sched = stage.schedule
        warmup = warmup_steps(sched, steps) if steps is not None else None
        plans.append(StagePlan(i, stage.name, tokens, steps, warmup, mixture, sched.max_lr, sched.min_lr, sched.decay))
    return plans


def tokens_per_step(recipe: Recipe) -> int:
    """Tokens of one optimizer step: batch.global x seq_len (the one place it is computed)."""
    return recipe.batch.global_ * recipe.seq_len


@dataclass
class PlanProblems:
    """What the plan of a recipe implies that the recipe alone cannot say: errors refuse the run
    (`strata check` and `strata train` both, with the same line), warnings are printed."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def plan_problems(recipe: Recipe, plans: list[StagePlan],
                  tokens_at: Callable[[int], dict[str, int]]) -> PlanProblems:
    """Every stage's budget below one step (a warning) and every source read more often than
    `data.max_passes` (an error for a replayed source, which silently overfits; a warning for an
    own source, a choice of the recipe). `tokens_at(i)`: prepared tokens per source as stage `i`
    reads them (its tokenizer's)."""
    out, step = PlanProblems(), tokens_per_step(recipe)
    for plan in plans:
        stage = recipe.stages[plan.index]
        if stage.tokens is not None and stage.tokens < step:
            out.warnings.append(f"stages[{plan.index}].tokens: {stage.tokens:,} is less than one step ({step:,} "
                                f"tokens = batch.global x seq_len); the stage trains 1 step ({step:,} tokens)")
        passes = plan.passes(tokens_at(plan.index))
        for c in plan.mixture:
            p = passes[c.source]
            if p is not None and p > recipe.data.max_passes:
                message = (f"stages[{plan.index}]: {'replay of ' if c.replay_of else ''}source {c.source!r} "
                           f"would be read {p:.1f} times (more than data.max_passes = {recipe.data.max_passes:g})")
                (out.errors if c.replay_of else out.warnings).append(message)
    return out


def grad_accum(recipe: Recipe, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank (batch.global = micro x grad_accum x world size).
    The one place this is computed; a global batch that does not divide is one error naming the recipe."""
    micro, global_batch = recipe.batch.micro, recipe.batch.global_
    if world_size < 1 or global_batch % (micro * world_size):
        raise StrataError(f"{recipe.file}: batch.global ({global_batch}) must be a multiple of batch.micro x "
                          f"world size ({micro} x {world_size} = {micro * world_size})").on_every_rank()
    return global_batch // (micro * world_size)
