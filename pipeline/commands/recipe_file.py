"""The recipe as every command opens it: parsed and validated, then its tokenizers loaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.tokenizer import check_tokenizers
from pipeline.errors import StrataError
from pipeline.recipe.load import load_recipe
from pipeline.recipe.plan import PlanProblems, StagePlan, build_plan, plan_problems
from pipeline.recipe.resolved import RESOLVED_RECIPE
from pipeline.recipe.spec import Recipe


def open_recipe(path: str | Path, prepared: bool = False) -> Recipe:
    """`load_recipe` (every problem of the file, by key path), then every tokenizer it names is
    loaded and stage tokenizers are checked to extend the one before them, so that a recipe
    `strata check` passes does not fail later on its tokenizer."""
    recipe = load_recipe(path, prepared)
    check_tokenizers(recipe)
    return recipe


def open_run_recipe(run_dir: Path) -> Recipe:
    """The recipe of a run folder, from any working directory: the copy with the paths resolved
    when the run started (older runs: recipe.yaml, read from where the run started); the sources'
    raw files need not exist any more, their prepared shards are what is read."""
    run_dir = Path(run_dir)
    for name in (RESOLVED_RECIPE, "recipe.yaml"):
        if (run_dir / name).is_file():
            return open_recipe(run_dir / name, prepared=True)
    raise StrataError(f"{run_dir}: not a run folder (no recipe.yaml)")


@dataclass(frozen=True)
class RecipePlan:
    """A recipe's plan from its prepared data, and what it implies; `strata check` prints it and
    `strata train` refuses by the same `problems.errors`, before any work."""

    plans: list[StagePlan]
    problems: PlanProblems
    tokens_at: Callable[[int], dict[str, int]]  # prepared tokens per source as stage i reads them


def recipe_plan(recipe: Recipe) -> RecipePlan:
    from pipeline.data.shards import prepared_tokens

    tokens = prepared_tokens(recipe)
    several = len(recipe.tokenizers()) > 1  # replayed sources are read in each stage's tokens

    def tokens_at(index: int) -> dict[str, int]:
        return prepared_tokens(recipe, index) if several else tokens

    plans = build_plan(recipe, tokens)
    return RecipePlan(plans, plan_problems(recipe, plans, tokens_at), tokens_at)
