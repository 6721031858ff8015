"""Recipe keys distill / regularize / merge: `strata check` prints each method and refuses nonsense."""

from __future__ import annotations

import pytest
from conftest import general_then_code, recipe_dict, write_recipe

from pipeline.cli import main
from pipeline.errors import RecipeError
from pipeline.recipe.load import parse_recipe


def recipe(tmp, code: dict, general: dict | None = None, **overrides) -> dict:
    stages = general_then_code(tmp, (2, 2), docs=3)
    stages[0].update(general or {})
    stages[1].update(code)
    return recipe_dict(tmp, stages, **overrides)


def problems(raw: dict, tmp) -> list[str]:
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "r.yaml", tmp)
    return e.value.problems


def test_nonsense_is_refused_with_every_problem_by_key_path(tmp_path):
    code = {"replay": None, "distill": {"teacher": "code", "weight": -1, "on": "replay"},
            "regularize": {"method": "l2", "weight": -0.5}, "merge": {"method": "slerp", "with": "code"}}
    found = problems(recipe(tmp_path, code), tmp_path)
    for expected in ("stages[1].distill.teacher: 'code' is itself",
                     "stages[1].distill.weight: must be >= 0",
                     "stages[1].distill.on: is replay, but the stage replays nothing",
                     "stages[1].regularize.weight: must be >= 0",
                     "stages[1].merge.with: 'code' is itself"):
        assert any(p.startswith(expected) for p in found), (expected, found)


def test_teacher_must_be_earlier_and_ewc_needs_earlier_data_and_zero3_penalties_are_accepted(tmp_path):
    general = {"distill": {"teacher": "code"}, "regularize": {"method": "ewc", "weight": 1.0}}
    found = problems(recipe(tmp_path, {"regularize": {"method": "l2", "weight": 1.0}}, general,
                            deepspeed={"zero_stage": 3}), tmp_path)
    assert any(p.startswith("stages[0].distill.teacher: 'code' is a later stage") for p in found), found
    assert any(p.startswith("stages[0].regularize.method: ewc needs earlier stages' data") for p in found), found
    assert not any("regularize" in p and "ZeRO-3" in p for p in found), found  # L2/EWC run under ZeRO-3
    found = problems(recipe(tmp_path, {"distill": {"teacher": "genral"}, "merge": {"weight": 1.5}}), tmp_path)
    assert any("'genral' is neither" in p and "did you mean 'general'" in p for p in found), found
    assert any(p.startswith("stages[1].merge.weight: must be <= 1") for p in found), found


def test_check_prints_each_method_in_the_plan(tmp_path, capsys):
    code = {"distill": {"teacher": "general", "weight": 0.5, "temperature": 2.0, "on": "replay"},
            "regularize": {"method": "ewc", "weight": 10.0, "fisher_tokens": 4096},
            "merge": {"method": "linear", "weight": 0.7}}
    path = write_recipe(tmp_path, recipe(tmp_path, code))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "distill: teacher general, loss CE + 0.5 * 2^2 * KL on replayed samples" in out
    assert "regularize: ewc, penalty 10/2 * sum F (theta - theta*)^2, Fisher on 4,096 earlier tokens" in out
    assert "merge: linear with previous at the stage end, weight 0.7 on the trained model" in out


@pytest.mark.parametrize("method", ["l2", "ewc"])
def test_regularize_weight_defaults_to_what_the_forgetting_experiment_chose_per_method(tmp_path, method):
    from pipeline.recipe.forgetting import REGULARIZE_WEIGHT

    parsed = parse_recipe(recipe(tmp_path, {"regularize": {"method": method}}), "r.yaml", tmp_path)
    assert parsed.stages[1].regularize.weight == REGULARIZE_WEIGHT[method] == {"l2": 0.01, "ewc": 1.0e4}[method]
    given = parse_recipe(recipe(tmp_path, {"regularize": {"method": method, "weight": 0.0}}), "r.yaml", tmp_path)
    assert given.stages[1].regularize.weight == 0.0  # an explicit 0 is kept, not replaced by the default


def test_repeating_the_tokenizer_in_force_is_no_change_for_distill_or_merge(tmp_path):
    from conftest import TOKENIZER

    same = {"tokenizer": str(TOKENIZER), "distill": {"weight": 1.0}, "merge": {"method": "linear", "weight": 0.5}}
    parsed = parse_recipe(recipe(tmp_path, same), "r.yaml", tmp_path)  # no problem at all
    assert parsed.stages[1].distill is not None and parsed.stages[1].merge is not None


def test_check_accepts_ewc_under_zero3_and_prints_its_partitioned_anchor_and_fisher_per_rank(tmp_path, capsys,
                                                                                               monkeypatch):
    model = {"init": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 704}}
    ewc = {"regularize": {"method": "ewc", "weight": 10.0, "fisher_tokens": 4096}}
    path = write_recipe(tmp_path, recipe(tmp_path, ewc, model=model, deepspeed={"zero_stage": 3}))
    held = {}
    for world in (1, 2):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        assert main(["check", str(path)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "stage 2 'code', extra copies" in x)
        gib = line.split("fisher: ")[1].split(" GiB")[0]
        assert f"fisher: {gib} GiB per rank (F, float32, 1/{world} per rank, ZeRO-3's partition)" in line, line
        held[world] = float(gib)
    assert held[2] == pytest.approx(held[1] / 2, abs=0.001) and held[1] > 0.01
