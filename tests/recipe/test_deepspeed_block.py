"""`deepspeed:` is a typed block: zero_stage (0-3, checked by key path) and every other DeepSpeed
key passed through as written; the YAML a user writes, and the stage hash, are as before."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import recipe_dict, small_corpus, write_recipe

from pipeline.errors import RecipeError
from pipeline.recipe.load import load_recipe, recipe_schema
from pipeline.train.trainer import deepspeed_config

PASSED = {"zero_optimization": {"overlap_comm": True}, "communication_data_type": "fp32",
          "gradient_clipping": 2.0}


def recipe_file(tmp_path, deepspeed=None):
    en = small_corpus(tmp_path, "en", 2)
    stages = [{"name": "a", "tokens": 4096, "schedule": {"max_lr": 1e-3}, "sources": [{"name": "en", "path": str(en)}]}]
    extra = {} if deepspeed is None else {"deepspeed": deepspeed}
    return write_recipe(tmp_path, recipe_dict(tmp_path, stages, **extra))


def test_zero_stage_is_typed_and_every_other_key_passes_through(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, {"zero_stage": 2, **PASSED}))
    assert recipe.deepspeed.zero_stage == recipe.zero_stage == 2
    assert recipe.deepspeed.config == PASSED  # no DeepSpeed key is an unknown key
    config = deepspeed_config(recipe, world_size=1, bf16=False)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True} and "zero_stage" not in config
    assert config["communication_data_type"] == "fp32"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert load_recipe(recipe_file(bare)).zero_stage == 0  # no block: ZeRO off


@pytest.mark.parametrize("value,problem", [(4, "must be 0, 1, 2 or 3, got 4"), ("two", "must be an integer, got 'two'")])
def test_a_bad_zero_stage_is_named_by_its_key_path(tmp_path, value, problem):
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file(tmp_path, {"zero_stage": value}))
    assert f"deepspeed.zero_stage: {problem}" in str(e.value)


def test_keys_strata_computes_are_refused_in_the_passthrough(tmp_path):
    with pytest.raises(RecipeError, match=r"deepspeed.train_batch_size: is computed by Strata; set batch.global"):
        load_recipe(recipe_file(tmp_path, {"zero_stage": 1, "train_batch_size": 16}))


def test_the_stage_hash_still_hashes_the_block_as_written(tmp_path):
    """Runs started before the block was typed must still resume: the hash reads the raw YAML."""
    recipe = load_recipe(recipe_file(tmp_path, {"zero_stage": 1, **PASSED}))
    raw = recipe.raw
    shared = {k: raw.get(k) for k in ("tokenizer", "model", "seq_len", "batch", "seed")}
    shared["deepspeed"] = raw["deepspeed"]
    before = hashlib.sha256(json.dumps([shared, raw["stages"][0]], sort_keys=True, default=str).encode()).hexdigest()
    assert recipe.stage_hash(0) == before[:16]


def test_the_schema_types_zero_stage_and_allows_any_other_key():
    block = recipe_schema()["properties"]["deepspeed"]
    assert block["properties"]["zero_stage"]["type"] == "integer"
    assert isinstance(block["additionalProperties"], dict)  # any other key, described
