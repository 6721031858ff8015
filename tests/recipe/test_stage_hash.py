"""The stage hash covers every key that changes a started stage's numbers, and no other."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from conftest import recipe_dict, small_corpus

from pipeline.recipe.load import parse_recipe
from pipeline.recipe.spec import CHANGEABLE_TRAIN_KEYS


@pytest.fixture
def raw(tmp_path) -> dict:
    en = small_corpus(tmp_path, "en", 2)
    return recipe_dict(tmp_path, [{"name": "a", "tokens": 4096, "schedule": {"max_lr": 1e-3},
                                   "sources": [{"name": "en", "path": str(en)}]}],
                       train={"weight_decay": 0.1, "log_every": 1}, deepspeed={"zero_stage": 1})


def stage_hash(raw: dict, tmp_path, **changes) -> str:
    raw = copy.deepcopy(raw)
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
    return parse_recipe(raw, "r.yaml", tmp_path).stage_hash(0)


@pytest.mark.parametrize("change", [{"train__weight_decay": 0.0}, {"train__grad_clip": 0.5},
                                    {"train__betas": [0.9, 0.99]}, {"train__dtype": "bf16"},
                                    {"deepspeed__zero_stage": 2}, {"deepspeed__gradient_clipping": 2.0},
                                    {"seq_len": 32}, {"seed": 8}])
def test_a_key_that_changes_the_numbers_changes_the_stage_hash(raw, tmp_path, change):
    assert stage_hash(raw, tmp_path, **change) != stage_hash(raw, tmp_path)


@pytest.mark.parametrize("change", [{"train__log_every": 5}, {"train__eval_tokens": 1000},
                                    {"train__num_workers": 2}, {"train__max_bad_steps": 9},
                                    {"checkpoint__every": 7}, {"checkpoint__keep": 4}])
def test_logging_eval_and_checkpoint_cadence_keys_may_change_mid_run(raw, tmp_path, change):
    assert stage_hash(raw, tmp_path, **change) == stage_hash(raw, tmp_path)
    key = next(iter(change)).split("__")
    assert key[0] != "train" or key[1] in CHANGEABLE_TRAIN_KEYS


def test_hashes_of_recipes_without_train_or_deepspeed_are_unchanged(raw, tmp_path):
    """Runs started before `train:`/`deepspeed:` were hashed must still resume."""
    bare = {k: v for k, v in raw.items() if k not in ("train", "deepspeed")}
    assert stage_hash(bare, tmp_path) == stage_hash({**bare, "train": {"log_every": 3}}, tmp_path)
    shared = {k: bare.get(k) for k in ("tokenizer", "model", "seq_len", "batch", "seed")}  # the formula before
    before = hashlib.sha256(json.dumps([shared, bare["stages"][0]], sort_keys=True, default=str).encode()).hexdigest()
    assert stage_hash(bare, tmp_path) == before[:16]
