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
        ref = stage.selection.reference if stage.selection is not None else None
        if ref is not None and ref not in names[:i] and Path(ref).expanduser().exists():
            section["selection"]["reference"] = str(Path(ref).expanduser().resolve())
    for j, src in enumerate(recipe.eval):
        raw["eval"][j]["path"] = src.path
    return raw
