"""How stage keys combine: the facts the recipe's checks need across stages and features.

Each feature checks its own keys (spec.py, forgetting.py); the refusals of combinations that
cannot be right are next to them and ask this module what the recipe implies: where the model
changes shape (`expand`, a new tokenizer), which frozen model shares a stage's vocabulary, and
which keys leave the embeddings frozen. docs/recipe.md "Which stage keys combine" lists what combines and what is
refused, and why.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from pipeline.recipe.typed_yaml import Problems


def reshaped_between(recipe: Any, j: int, k: int) -> str | None:
    """The first stage after stage `j` up to stage `k` (inclusive) that changes the model's shape
    (`expand`, or a new tokenizer that grows the embeddings), or None."""
    for n in range(j + 1, k + 1):
        stage = recipe.stages[n]
        if stage is not None and (stage.expand is not None or new_tokenizer(recipe, n)):
            return stage.name
    return None


def new_tokenizer(recipe: Any, n: int) -> bool:
    stage = recipe.stages[n]
    if stage is None or stage.tokenizer is None:
        return False
    before = next((s.tokenizer for s in reversed(recipe.stages[:n]) if s is not None and s.tokenizer), recipe.tokenizer)
    return stage.tokenizer != before


def same_vocabulary(name: str, path: str, what: str, i: int, names: list, recipe: Any, problems: Problems,
                     upto: int | None = None) -> None:
    """A frozen model named by an earlier stage must predict over this stage's vocabulary: no new
    tokenizer after it, up to stage `upto` (default the stage before this one)."""
    if name not in names[:i]:
        return
    last = i - 1 if upto is None else upto
    changed = next((recipe.stages[n].name for n in range(names.index(name) + 1, last + 1)
                    if new_tokenizer(recipe, n)), None)
    if changed is not None:
        problems.add(path, f"stage {name!r} predates the new tokenizer of stage {changed!r}; a {what} must share "
                     "this stage's vocabulary (name a later stage)")


def frozen_embeddings(stage: Any) -> str | None:
    """The stage key that leaves the input embeddings frozen (`trainable`, `adapter`,
    `expand.freeze_old`), or None when they train."""
    if stage.trainable:
        return None if any(fnmatch.fnmatchcase("model.embed_tokens.weight", p) for p in stage.trainable) else "trainable"
    exp = stage.expand
    if exp is not None and exp.freeze_old and (exp.method == "llama_pro" or exp.add_experts is not None):
        return "expand.freeze_old"
    return "adapter" if stage.adapter is not None else None
