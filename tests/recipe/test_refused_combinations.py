"""Combinations of stage keys that cannot be right are refused by the recipe, one line per key path.

Each refusal here was a combination that trained without complaint and did something else than
the recipe says (docs/recipe.md "Which stage keys combine"); each test also checks that the neighbouring
combination that is right is still accepted.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import TOKENIZER, general_then_code, recipe_dict, small_corpus

from pipeline.errors import RecipeError
from pipeline.recipe.load import parse_recipe

LORA = {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}


def three_stages(tmp, third: dict, second: dict | None = None, **overrides) -> dict:
    """general, code, then a third stage on the same code corpus with `third`'s keys."""
    stages = general_then_code(tmp, (2, 2), docs=3)
    stages[1].update(second or {})
    stages.append({"name": "more", "tokens": 8 * 64 * 2, "schedule": stages[0]["schedule"],
                   "sources": [{"name": "py2", "path": stages[1]["sources"][0]["path"]}], **third})
    return recipe_dict(tmp, stages, **overrides)


def problems(raw: dict, tmp) -> list[str]:
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "r.yaml", tmp)
    return e.value.problems


def accepted(raw: dict, tmp) -> None:
    parse_recipe(raw, "r.yaml", tmp)


def new_tokenizer(tmp) -> str:
    """Another tokenizer file: for the recipe alone a stage tokenizer is new when its path differs
    (whether it extends the old one is `strata check`'s file-level check)."""
    path = tmp / "other.model"
    shutil.copy(TOKENIZER, path)
    return str(path)


def test_regularize_with_an_adapter_is_refused_but_with_trainable_accepted(tmp_path):
    found = problems(three_stages(tmp_path, {"adapter": LORA, "regularize": {"method": "l2", "weight": 1.0}}), tmp_path)
    assert any(p.startswith("stages[2].regularize: cannot be combined with adapter") for p in found), found
    accepted(three_stages(tmp_path, {"trainable": ["model.layers.*.mlp.*"],
                                     "regularize": {"method": "ewc", "weight": 1.0}}), tmp_path)


def test_ewc_in_the_first_stage_needs_pretraining_sources_which_then_enter_its_hash(tmp_path):
    raw = three_stages(tmp_path, {})
    raw["stages"][0]["regularize"] = {"method": "ewc", "weight": 1.0, "fisher_tokens": 1024}
    found = problems(raw, tmp_path)
    assert any(p.startswith("stages[0].regularize.method: ewc needs earlier stages' data") and "pretraining:" in p
               for p in found), found
    raw["pretraining"] = [{"name": "base", "path": str(small_corpus(tmp_path, "de", 3))}]
    before = parse_recipe(raw, "r.yaml", tmp_path).stage_hash(0)
    raw["pretraining"][0]["weight"] = 2.0  # another Fisher: the first stage's hash changes
    assert parse_recipe(raw, "r.yaml", tmp_path).stage_hash(0) != before


def test_merge_with_a_stage_before_an_expansion_is_refused(tmp_path):
    moe = {"expand": {"method": "moe", "experts": 2, "top_k": 1}}
    found = problems(three_stages(tmp_path, {"merge": {"with": "general"}}, second=moe), tmp_path)
    assert any(p.startswith("stages[2].merge.with: stage 'general' has another shape") and "'code'" in p
               for p in found), found
    found = problems(three_stages(tmp_path, {"merge": {"with": "general"}}, second={"tokenizer": new_tokenizer(tmp_path),
                                                                                   "distill": None}), tmp_path)
    assert any(p.startswith("stages[2].merge.with: stage 'general' has another shape") for p in found), found
    # after the expansion both are MoE models of one shape (mergekit merges Mixtrals)
    accepted(three_stages(tmp_path, {"merge": {"with": "code"}}, second=moe), tmp_path)
    accepted(three_stages(tmp_path, {"merge": {"with": "previous"}}, second=moe), tmp_path)


def test_a_teacher_or_reference_from_before_a_new_tokenizer_is_refused(tmp_path):
    second = {"tokenizer": new_tokenizer(tmp_path)}
    found = problems(three_stages(tmp_path, {"distill": {"teacher": "general"}}, second=second), tmp_path)
    assert any(p.startswith("stages[2].distill.teacher: stage 'general' predates the new tokenizer of stage 'code'")
               for p in found), found
    found = problems(three_stages(tmp_path, {}, second={**second, "selection": {"reference": "general"}}), tmp_path)
    assert any(p.startswith("stages[1].selection.reference: stage 'general' predates the new tokenizer")
               for p in found), found
    accepted(three_stages(tmp_path, {"distill": {"teacher": "code"}}, second=second), tmp_path)
    accepted(three_stages(tmp_path, {"distill": {"teacher": "previous"}}, second=second), tmp_path)


@pytest.mark.parametrize("keys, key", [
    ({"adapter": LORA}, "adapter"),
    ({"trainable": ["model.layers.*"]}, "trainable"),
    ({"expand": {"method": "moe", "add_experts": 1}}, "expand.freeze_old"),
])
def test_a_new_tokenizer_with_frozen_embeddings_is_refused(tmp_path, keys, key):
    first = {"expand": {"method": "moe", "experts": 2, "top_k": 1}} if "expand" in keys else {}
    raw = three_stages(tmp_path, {"tokenizer": new_tokenizer(tmp_path), **keys}, second=first)
    found = problems(raw, tmp_path)
    assert any(p.startswith(f"stages[2].{key}: ") and "new rows" in p for p in found), found
    raw["stages"][2]["trainable"] = ["model.embed_tokens.*", "lm_head.*"]  # the new rows train: fine
    accepted(raw, tmp_path)
