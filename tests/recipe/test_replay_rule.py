"""One replay rule: the names `replay.weights` accepts are exactly the sources the plan mixes as
replay (spec.py's Recipe.replayed_sources / replay_weight_names, read by load.py and plan.py)."""

from __future__ import annotations

import pytest
from conftest import recipe_dict

from pipeline.errors import RecipeError
from pipeline.recipe.generated import GENERATED
from pipeline.recipe.load import parse_recipe
from pipeline.recipe.plan import stage_mixture

CANDIDATES = ("en", "py", "de", "web", GENERATED)
GENERATE = {"tokens": 1000}


def corpus(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.txt"
    path.write_text(f"a document of {name}\n")
    return str(path)


def raw_recipe(tmp_path, replay: dict, pretraining: bool) -> dict:
    def stage(name: str, source: str, **extra) -> dict:
        return {"name": name, "tokens": 4096, "schedule": {"max_lr": 1e-3},
                "sources": [{"name": source, "path": corpus(tmp_path, source)}], **extra}

    stages = [stage("a", "en"), stage("b", "py"), stage("c", "de", replay=replay)]
    extra = {"pretraining": [{"name": "web", "path": corpus(tmp_path, "web")}]} if pretraining else {}
    return recipe_dict(tmp_path, stages, **extra)


def accepted(tmp_path, replay: dict, pretraining: bool) -> set[str]:
    """The candidate names that the recipe's checks take in stage c's replay.weights."""
    out = set()
    for name in CANDIDATES:
        try:
            parse_recipe(raw_recipe(tmp_path, {**replay, "weights": {name: 1.0}}, pretraining), "r.yaml", tmp_path)
        except RecipeError as e:
            assert "stages[2].replay.weights." + name in str(e), str(e)
            continue
        out.add(name)
    return out


def mixed(tmp_path, replay: dict, pretraining: bool) -> set[str]:
    """The sources stage c's plan replays, with every candidate the checks take weighted 1."""
    recipe = parse_recipe(raw_recipe(tmp_path, replay, pretraining), "r.yaml", tmp_path)
    return {GENERATED if c.replay_of == GENERATED else c.source for c in stage_mixture(recipe, 2) if c.replay_of}


@pytest.mark.parametrize("replay,pretraining,expected", [
    ({"ratio": 0.2}, False, {"en", "py"}),
    ({"ratio": 0.2}, True, {"en", "py", "web"}),
    ({"ratio": 0.2, "from": ["a"]}, True, {"en"}),
    ({"ratio": 0.2, "from": ["pretraining", "b"]}, True, {"web", "py"}),
    ({"ratio": 0.2, "generate": GENERATE}, True, {GENERATED}),
    ({"ratio": 0.2, "from": ["b"], "generate": GENERATE}, True, {"py", GENERATED}),
], ids=["all-earlier", "all-earlier-and-pretraining", "from", "from-pretraining", "generate", "from-and-generate"])
def test_replay_weights_accept_exactly_the_sources_the_plan_mixes(tmp_path, replay, pretraining, expected):
    names = accepted(tmp_path, replay, pretraining)
    assert names == expected
    assert mixed(tmp_path, replay, pretraining) == expected  # with their own weights
    weighted = {**replay, "weights": {name: 1.0 for name in names}}
    assert mixed(tmp_path, weighted, pretraining) == expected  # with every accepted name weighted


def test_the_rule_holds_on_a_recipe_still_being_checked(tmp_path):
    """A stage that failed to load (None) and an unknown name in `from` replay nothing, and the
    weights check says so instead of failing."""
    raw = raw_recipe(tmp_path, {"ratio": 0.2, "from": ["a", "nope"], "weights": {"en": 1.0, "py": 1.0}}, False)
    raw["stages"][1] = "b"  # stage b fails to load: None to the checks
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "r.yaml", tmp_path)
    problems = str(e.value)
    assert "stages[1]: must be a mapping" in problems and "stages[2].replay.from[1]: unknown stage 'nope'" in problems
    assert "stages[2].replay.weights.py: is not a source of the replayed stages" in problems
    assert "replay.weights.en" not in problems
