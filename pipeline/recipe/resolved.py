"""The recipe with every path made absolute, as a run records it when it starts.

A recipe's relative paths (tokenizer, sources, model, data folder) mean something only from the
working directory the run was started in. The run folder keeps the recipe as written
(RUN_DIR/recipe.yaml: its stage hashes are what a resume compares) and beside it this resolved
copy (RUN_DIR/recipe.resolved.yaml), so that `strata eval RUN_DIR` works from any directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pipeline.recipe.spec import Recipe

RESOLVED_RECIPE = "recipe.resolved.yaml"


def _folder(value: str, recipe: Recipe) -> str:
    """A folder as the loader finds it: from the working directory, else beside the recipe."""
    path = Path(value).expanduser()
    for candidate in (path, Path(recipe.file).parent / path):
        if candidate.exists():
            return str(candidate.resolve())
    return value


def resolved_raw(recipe: Recipe) -> dict[str, Any]:
    """`recipe.raw` with the absolute paths load_recipe resolved (and the data folder made absolute)."""
    raw = copy.deepcopy(recipe.raw)
    raw["tokenizer"] = recipe.tokenizer
    if recipe.model.from_pretrained is not None:
        raw["model"]["from_pretrained"] = recipe.model.from_pretrained
    raw.setdefault("data", {})
    raw["data"] = {**(raw["data"] or {}), "dir": str(recipe.data_dir.resolve())}
    names = [s.name for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        section = raw["stages"][i]
        if stage.tokenizer is not None:
            section["tokenizer"] = stage.tokenizer
        for j, src in enumerate(stage.sources):
            section["sources"][j]["path"] = src.path
        # a model named by a folder rather than by an earlier stage (or `previous`)
        for key, field in (("selection", "reference"), ("distill", "teacher")):
            value = (section.get(key) or {}).get(field)
            if isinstance(value, str) and value != "previous" and value not in names[:i]:
                section[key][field] = _folder(value, recipe)
    for key in ("eval", "pretraining"):  # lists of sources
        for j, src in enumerate(getattr(recipe, key)):
            raw[key][j]["path"] = src.path
    if recipe.evaluation.tasks:  # local task YAMLs were resolved by the loader, harness names kept
        raw["evaluation"]["tasks"] = list(recipe.evaluation.tasks)
    return raw
