"""`pretraining:`: the base model's corpus, replayable from the first stage and evaluated as old domains."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import prepared_recipe, recipe_dict

from pipeline.cli import main
from pipeline.data.stream import StageStream
from pipeline.errors import RecipeError
from pipeline.evaluate.heldout import INIT, DomainData, EvalFile, recipe_domains
from pipeline.recipe.load import load_recipe, parse_recipe
from pipeline.recipe.plan import Component, stage_mixture


def stages(paths: dict, second_replay: dict | None = None) -> list[dict]:
    return [
        {"name": "german", "tokens": 10 * 8 * 64, "schedule": {"max_lr": 1e-3},
         "sources": [{"name": "de", "path": str(paths["de"])}], "replay": {"ratio": 0.25}},
        {"name": "code", "tokens": 10 * 8 * 64, "schedule": {"max_lr": 1e-3},
         "sources": [{"name": "py", "path": str(paths["py"])}],
         "replay": second_replay or {"ratio": 0.5, "from": ["pretraining"]}},
    ]


def test_the_first_stage_replays_the_pretraining_corpus(tmp_path, three_sources, capsys):
    raw = recipe_dict(tmp_path, stages(three_sources), pretraining=[{"name": "en", "path": str(three_sources["en"])}])
    recipe = load_recipe(prepared_recipe(tmp_path, raw))
    assert stage_mixture(recipe, 0) == (Component("de", 0.75), Component("en", 0.25, replay_of="pretraining"))
    assert stage_mixture(recipe, 1) == (Component("py", 0.5), Component("en", 0.5, replay_of="pretraining"))
    first = StageStream(recipe, 0).global_sources(0, 40)
    assert first.count("en") == 10 and first.count("de") == 30
    # the default "all earlier" of a later stage includes the pretraining corpus
    later = parse_recipe(recipe_dict(tmp_path, stages(three_sources, {"ratio": 0.5}), pretraining=raw["pretraining"]))
    assert {c.replay_of for c in stage_mixture(later, 1) if c.replay_of} == {"pretraining", "german"}
    capsys.readouterr()
    assert main(["check", str(tmp_path / "recipe.yaml")]) == 0
    out = capsys.readouterr().out
    assert "pretraining (learned before stage 0; replayable, evaluated as old domains): en (" in out
    assert "replay of 'pretraining'" in out


def test_replay_without_a_pretraining_corpus_is_refused_by_key(tmp_path, three_sources):
    bad = stages(three_sources)
    bad.append({"name": "pretraining", "schedule": {"max_lr": 1e-3}, "sources": [{"name": "x", "path": str(three_sources["en"])}]})
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe_dict(tmp_path, bad), "r.yaml")
    text = str(e.value)
    assert "stages[0].replay: the first stage has no earlier stage to replay" in text
    assert "stages[1].replay.from[0]: the recipe lists no `pretraining:` sources to replay" in text
    assert "stages[2].name: 'pretraining' is reserved" in text


def test_eval_treats_pretraining_domains_as_learned_before_stage_0(tmp_path, three_sources):
    raw = recipe_dict(tmp_path, stages(three_sources), pretraining=[{"name": "en", "path": str(three_sources["en"])}])
    recipe = parse_recipe(raw)
    domains = [(d, DomainData(np.zeros(9, dtype=np.int64), 0, "fp")) for d in recipe_domains(recipe)]
    assert [(d.name, d.stage) for d, _ in domains] == [("en", -1), ("de", 0), ("py", 1)]
    file = EvalFile(tmp_path)
    losses = {INIT: [3.0, 5.0, 6.0], "german": [3.5, 2.0, 5.5], "code": [3.25, 2.5, 1.5]}
    for e, vals in losses.items():  # as the evaluation after each stage adds them
        file.add(e, {n: {"loss": v, "perplexity": 1.0, "accuracy": 0.0} for n, v in zip(("en", "de", "py"), vals)})
    doc = file.write(recipe, domains)
    assert doc["domains"][0] == {"name": "en", "stage": "pretraining", "stage_index": -1, "kind": "pretraining",
                                 "tokens": 8}
    loss = doc["metrics"]["loss"]
    # after german: en rose 3.0 -> 3.5, forgotten from the start; after code: en (3.25 vs best 3.0) and de (2.5 vs 2.0)
    assert loss["FGT"]["german"] == pytest.approx(0.5) and loss["BWT"]["german"] == pytest.approx(-0.5)
    assert loss["FGT"]["code"] == pytest.approx((0.25 + 0.5) / 2)
    assert loss["AA"]["german"] == pytest.approx((3.5 + 2.0) / 2)
