"""DeepSpeed's config is built from the recipe: batch arithmetic checked first, extras passed through."""

from __future__ import annotations

import pytest
from conftest import recipe_dict

from pipeline.errors import StrataError
from pipeline.recipe.load import parse_recipe
from pipeline.train.trainer import deepspeed_config


def recipe_with(tmp_path, **overrides):
    src = tmp_path / "x.txt"
    src.write_text("hello\n")
    stages = [{"name": "a", "sources": [{"name": "x", "path": str(src)}], "schedule": {"max_lr": 1e-3}}]
    return parse_recipe(recipe_dict(tmp_path, stages, **overrides), "t.yaml", tmp_path)


def test_batch_arithmetic_and_passthrough(tmp_path):
    recipe = recipe_with(tmp_path, batch={"micro": 2, "global": 16},
                         deepspeed={"zero_stage": 2, "zero_optimization": {"overlap_comm": True},
                                    "communication_data_type": "fp32"},
                         train={"grad_clip": 0.5})
    config = deepspeed_config(recipe, world_size=4, bf16=True)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (16, 2, 2)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert config["communication_data_type"] == "fp32"
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert config["zero_allow_untested_optimizer"] is True
    assert "zero_stage" not in config


def test_global_batch_not_divisible_by_micro_times_world_is_a_user_error(tmp_path):
    recipe = recipe_with(tmp_path, batch={"micro": 2, "global": 8})
    assert deepspeed_config(recipe, world_size=2, bf16=False)["gradient_accumulation_steps"] == 2
    with pytest.raises(StrataError, match=r"batch.global \(8\) must be a multiple of batch.micro x world size \(2 x 3 = 6\)"):
        deepspeed_config(recipe, world_size=3, bf16=False)
