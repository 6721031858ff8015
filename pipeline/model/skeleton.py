"""A stage's model on the meta device: its architecture and parameter names, no memory, no weights.

`strata check` counts what each stage trains on it, and `strata train` refuses, before any stage
runs, a recipe whose adapter `targets` or `trainable:` patterns name nothing in some stage's model
(the same checks `build_stage_model` makes when the stage starts). A `from_pretrained` model is
built from its config alone (pipeline/model/build.py), so this reads no checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import RecipeError
from pipeline.model.expand import build_stage_model
from pipeline.recipe.spec import Recipe


def stage_skeleton(recipe: Recipe, index: int) -> nn.Module:
    """Stage `index`'s model (expansions, adapter and `trainable:` applied) on the meta device;
    RecipeError when an adapter target or a trainable pattern matches nothing."""
    from pipeline.data.tokenizer import cached_tokenizer

    tok = cached_tokenizer(recipe.tokenizer)
    with torch.device("meta"):
        model, _ = build_stage_model(recipe, index, tok.vocab_size, tok.eos_id)
    return model


def refuse_unmatched_names(recipe: Recipe) -> None:
    """One RecipeError listing every stage's adapter target and trainable pattern that matches nothing."""
    problems: list[str] = []
    for index, stage in enumerate(recipe.stages):
        if stage.adapter is None and not stage.trainable:
            continue
        try:
            stage_skeleton(recipe, index)
        except RecipeError as e:
            problems += e.problems
    if problems:
        raise RecipeError(recipe.file, problems)
