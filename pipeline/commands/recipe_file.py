"""The recipe as every command opens it: parsed and validated, then its tokenizers loaded."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.tokenizer import check_tokenizers
from pipeline.recipe.spec import Recipe, load_recipe


def open_recipe(path: str | Path) -> Recipe:
    """`load_recipe` (every problem of the file, by key path), then every tokenizer it names is
    loaded and stage tokenizers are checked to extend the one before them, so that a recipe
    `strata check` passes does not fail later on its tokenizer."""
    recipe = load_recipe(path)
    check_tokenizers(recipe)
    return recipe
