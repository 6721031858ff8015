"""The recipe: typed loading, validation that names every problem by key path, `strata check`, the schema."""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TOKENIZER, prepared_recipe, recipe_dict, small_corpus, write_recipe

from pipeline.cli import main
from pipeline.errors import RecipeError
from pipeline.recipe.load import load_recipe, parse_recipe, recipe_schema
from pipeline.recipe.plan import stage_mixture
from pipeline.recipe.spec import Recipe

DEMO_RECIPES = sorted((REPO / "data_recipes").glob("*.yaml"))


# ---------------------------------------------------------------------------------------------
# A valid two-stage recipe over real demo text, mutated into bad ones.


@pytest.fixture
def corpora(tmp_path: Path) -> dict[str, Path]:
    return {"en": small_corpus(tmp_path, "en", 3, chars=300), "py": small_corpus(tmp_path, "code", 3, chars=300),
            "de": small_corpus(tmp_path, "de", 3, chars=300)}


def good_recipe(tmp: Path, corpora: dict[str, Path]) -> dict:
    stages = [
        {"name": "prose", "tokens": 8 * 64 * 10, "schedule": {"max_lr": 1e-3, "min_lr": 1e-4, "warmup": 0.1},
         "sources": [{"name": "en", "path": str(corpora["en"]), "weight": 2.0}]},
        {"name": "code", "tokens": 8 * 64 * 5, "schedule": {"max_lr": 5e-4, "decay": "wsd"},
         "sources": [{"name": "py", "path": str(corpora["py"]), "weight": 1.0}],
         "replay": {"ratio": 0.25, "from": ["prose"]}},
    ]
    return recipe_dict(tmp, stages)


def problems_of(tmp: Path, raw: dict) -> list[str]:
    path = write_recipe(tmp, raw, "bad.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.file == str(path)
    return info.value.problems


def has(problems: list[str], path: str, fragment: str) -> bool:
    return any(p.startswith(f"{path}: ") and fragment in p for p in problems)


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        d = d[int(key)] if isinstance(d, list) else d[key]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


def _del(d: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        d = d[int(key)] if isinstance(d, list) else d[key]
    del d[last]


def _rename(d: dict, dotted: str, new: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        d = d[int(key)] if isinstance(d, list) else d[key]
    d[new] = d.pop(last)


def _third_stage(r: dict) -> None:
    r["stages"].append({"name": "german", "tokens": 1024, "schedule": {"max_lr": 1e-4},
                        "sources": [{"name": "de", "path": r["stages"][0]["sources"][0]["path"]}]})


# (id, mutation, [(key path, message fragment), ...]): the recipe must report exactly these problems.
BAD = [
    ("weight-zero", lambda r: _set(r, "stages.1.sources.0.weight", 0),
     [("stages[1].sources[0].weight", "must be > 0")]),
    ("weight-negative", lambda r: _set(r, "stages.0.sources.0.weight", -1.5),
     [("stages[0].sources[0].weight", "must be > 0")]),
    ("unknown-key-did-you-mean", lambda r: _rename(r, "stages.0.schedule", "shedule"),
     [("stages[0].shedule", "unknown key (did you mean 'schedule'?)"),
      ("stages[0].schedule", "required")]),
    ("unknown-source-key", lambda r: _set(r, "stages.0.sources.0.text_feild", "text"),
     [("stages[0].sources[0].text_feild", "unknown key (did you mean 'text_field'?)")]),
    ("unknown-top-level-key", lambda r: _set(r, "seeed", 3),
     [("seeed", "unknown key (did you mean 'seed'?)")]),
    ("missing-seq-len", lambda r: _del(r, "seq_len"), [("seq_len", "required")]),
    ("missing-source-path", lambda r: _del(r, "stages.0.sources.0.path"), [("stages[0].sources[0].path", "required")]),
    ("missing-max-lr", lambda r: _del(r, "stages.1.schedule.max_lr"), [("stages[1].schedule.max_lr", "required")]),
    ("seq-len-not-int", lambda r: _set(r, "seq_len", "long"), [("seq_len", "must be an integer")]),
    ("seq-len-fraction", lambda r: _set(r, "seq_len", 64.5), [("seq_len", "must be an integer")]),
    ("seq-len-bool", lambda r: _set(r, "seq_len", True), [("seq_len", "must be an integer")]),
    ("seq-len-zero", lambda r: _set(r, "seq_len", 0), [("seq_len", "must be > 0")]),
    ("tokens-negative", lambda r: _set(r, "stages.0.tokens", -5), [("stages[0].tokens", "must be > 0")]),
    ("weight-not-number", lambda r: _set(r, "stages.0.sources.0.weight", "heavy"),
     [("stages[0].sources[0].weight", "must be a number")]),
    ("sources-not-list", lambda r: _set(r, "stages.0.sources", {"name": "en"}), [("stages[0].sources", "must be a list")]),
    ("stage-not-mapping", lambda r: _set(r, "stages.1", "code"), [("stages[1]", "must be a mapping")]),
    ("no-stages", lambda r: _set(r, "stages", []), [("stages", "must list at least one stage")]),
    ("no-sources", lambda r: _set(r, "stages.0.sources", []), [("stages[0].sources", "must list at least one source")]),
    ("duplicate-stage", lambda r: _set(r, "stages.1.name", "prose"),
     [("stages[1].name", "duplicate stage name 'prose' (also stages[0])")]),
    ("reserved-stage-name", lambda r: _set(r, "stages.0.name", "init"),
     [("stages[0].name", "'init' is reserved"), ("stages[1].replay.from[0]", "unknown stage 'prose'")]),
    ("duplicate-source", lambda r: _set(r, "stages.1.sources.0.name", "en"),
     [("stages[1].sources[0].name", "duplicate source name 'en'")]),
    ("source-name-with-slash", lambda r: _set(r, "stages.0.sources.0.name", "a/b"),
     [("stages[0].sources[0].name", "must start with a letter or digit")]),
    ("missing-source-file", lambda r: _set(r, "stages.0.sources.0.path", "no/such/file.jsonl"),
     [("stages[0].sources[0].path", "file or folder not found: no/such/file.jsonl")]),
    ("missing-tokenizer", lambda r: _set(r, "tokenizer", "tokenizers/nope.model"),
     [("tokenizer", "file or folder not found")]),
    ("global-not-multiple-of-micro", lambda r: _set(r, "batch", {"micro": 3, "global": 8}),
     [("batch.global", "must be a multiple of batch.micro (3)")]),
    ("replay-ratio-one", lambda r: _set(r, "stages.1.replay.ratio", 1.0), [("stages[1].replay.ratio", "must be < 1")]),
    ("replay-ratio-above-one", lambda r: _set(r, "stages.1.replay.ratio", 1.5), [("stages[1].replay.ratio", "must be < 1")]),
    ("replay-from-later-stage", lambda r: (_third_stage(r), _set(r, "stages.1.replay.from", ["german"])),
     [("stages[1].replay.from[0]", "'german' is not an earlier stage")]),
    ("replay-from-itself", lambda r: _set(r, "stages.1.replay.from", ["code"]),
     [("stages[1].replay.from[0]", "'code' is not an earlier stage")]),
    ("replay-from-unknown", lambda r: _set(r, "stages.1.replay.from", ["proze"]),
     [("stages[1].replay.from[0]", "unknown stage 'proze' (did you mean 'prose'?)")]),
    ("replay-in-first-stage", lambda r: _set(r, "stages.0.replay", {"ratio": 0.1}),
     [("stages[0].replay", "the first stage has no earlier stage to replay")]),
    ("min-lr-above-max-lr", lambda r: _set(r, "stages.0.schedule.min_lr", 1e-2),
     [("stages[0].schedule.min_lr", "must be <= max_lr")]),
    ("warmup-fractional-steps", lambda r: _set(r, "stages.0.schedule.warmup", 2.5),
     [("stages[0].schedule.warmup", "whole number of steps")]),
    ("bad-decay", lambda r: _set(r, "stages.0.schedule.decay", "cosin"),
     [("stages[0].schedule.decay", "must be one of 'cosine', 'linear', 'constant', 'wsd', got 'cosin' (did you mean 'cosine'?)")]),
    ("bad-on-error", lambda r: _set(r, "stages.0.sources.0.on_error", "ignore"),
     [("stages[0].sources[0].on_error", "must be one of 'skip', 'fail'")]),
    ("from-without-date-field", lambda r: _set(r, "stages.0.sources.0.from", "2020-01-01"),
     [("stages[0].sources[0].date_field", "required when from/to slice the source by date")]),
    ("to-before-from", lambda r: r["stages"][0]["sources"][0].update(
        {"date_field": "date", "from": dt.date(2021, 1, 1), "to": dt.date(2020, 1, 1)}),
     [("stages[0].sources[0].to", "must not be before from")]),
    ("bad-date", lambda r: r["stages"][0]["sources"][0].update({"date_field": "date", "from": "2020-13-45"}),
     [("stages[0].sources[0].from", "must be a date (YYYY-MM-DD)")]),
    ("deepspeed-train-batch-size", lambda r: _set(r, "deepspeed", {"zero_stage": 2, "train_batch_size": 16}),
     [("deepspeed.train_batch_size", "is computed by Strata")]),
    ("deepspeed-micro-batch", lambda r: _set(r, "deepspeed", {"train_micro_batch_size_per_gpu": 2}),
     [("deepspeed.train_micro_batch_size_per_gpu", "is computed by Strata")]),
    ("deepspeed-zero-stage", lambda r: _set(r, "deepspeed", {"zero_stage": 4}),
     [("deepspeed.zero_stage", "must be 0, 1, 2 or 3")]),
    ("init-and-from-pretrained", lambda r: _set(r, "model.from_pretrained", str(r["__tmp"])),
     [("model", "give exactly one of init or from_pretrained"),
      ("model.from_pretrained", "not a Hugging Face model folder")]),
    ("neither-init-nor-from-pretrained", lambda r: _set(r, "model", {}),
     [("model", "give exactly one of init or from_pretrained")]),
    ("heads-do-not-divide-width", lambda r: _set(r, "model.init.num_heads", 5),
     [("model.init.hidden_size", "must be a multiple of num_heads (5)")]),
    ("heldout-too-large", lambda r: _set(r, "data.heldout", 0.5), [("data.heldout", "must be < 0.5")]),
    ("expand-without-layers", lambda r: _set(r, "stages.1.expand", {"method": "llama_pro"}),
     [("stages[1].expand.add_layers", "required for method llama_pro")]),
    ("selection-unknown-reference", lambda r: _set(r, "stages.1.selection", {"reference": "nowhere"}),
     [("stages[1].selection.reference", "is neither an earlier stage nor a Hugging Face model folder")]),
]


@pytest.mark.parametrize("mutate,expected", [pytest.param(m, e, id=i) for i, m, e in BAD])
def test_bad_recipe_reports_the_problem_by_key_path(tmp_path, corpora, mutate, expected):
    raw = good_recipe(tmp_path, corpora)
    raw["__tmp"] = tmp_path
    mutate(raw)
    del raw["__tmp"]
    problems = problems_of(tmp_path, raw)
    for path, fragment in expected:
        assert has(problems, path, fragment), (path, fragment, problems)
    assert len(problems) == len(expected), problems


def test_the_good_recipe_loads_into_typed_dataclasses(tmp_path, corpora):
    raw = good_recipe(tmp_path, corpora)
    recipe = load_recipe(write_recipe(tmp_path, raw))
    assert isinstance(recipe, Recipe)
    assert [s.name for s in recipe.stages] == ["prose", "code"]
    assert recipe.batch.global_ == 8 and recipe.batch.micro == 2
    assert recipe.stages[1].replay.ratio == 0.25 and recipe.stages[1].replay.from_ == ["prose"]
    assert recipe.stages[0].sources[0].weight == 2.0 and isinstance(recipe.stages[0].sources[0].weight, float)
    assert recipe.stages[1].schedule.decay == "wsd"
    assert recipe.model.init.hidden_size == 64
    assert recipe.replay_stages(1) == ["prose"] and recipe.replay_stages(0) == []
    assert Path(recipe.tokenizer) == TOKENIZER.resolve()
    # defaults the recipe did not give
    assert recipe.stages[0].sources[0].text_field == "text" and recipe.stages[0].sources[0].on_error == "skip"
    assert recipe.stages[0].reset_optimizer is True


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, corpora, monkeypatch):
    raw = good_recipe(tmp_path, corpora)
    raw["stages"][0]["sources"][0]["path"] = corpora["en"].name  # relative to the recipe's folder
    path = write_recipe(tmp_path, raw)
    monkeypatch.chdir(REPO)
    recipe = load_recipe(path)
    assert Path(recipe.stages[0].sources[0].path) == corpora["en"].resolve()


def test_numbers_written_like_yaml_1_1_strings_are_accepted(tmp_path, corpora):
    raw = good_recipe(tmp_path, corpora)
    text = yaml.safe_dump(raw, sort_keys=False).replace("max_lr: 0.001", "max_lr: 1e-3")
    raw = yaml.safe_load(text)
    raw["stages"][0]["tokens"] = "2e6"
    recipe = parse_recipe(raw, recipe_dir=tmp_path)
    assert recipe.stages[0].schedule.max_lr == 1e-3
    assert recipe.stages[0].tokens == 2_000_000 and isinstance(recipe.stages[0].tokens, int)


def test_one_recipe_with_many_field_problems_reports_all_of_them(tmp_path, corpora):
    raw = good_recipe(tmp_path, corpora)
    raw["seq_len"] = "long"
    raw["stages"][1]["sources"][0]["weight"] = 0
    raw["stages"][0]["shedule"] = raw["stages"][0].pop("schedule")
    raw["stages"][1]["schedule"]["decay"] = "cosin"
    raw["stages"][1]["replay"]["ratio"] = 1.0
    del raw["batch"]["micro"]
    problems = problems_of(tmp_path, raw)
    for path, fragment in [("seq_len", "must be an integer"), ("stages[1].sources[0].weight", "must be > 0"),
                           ("stages[0].shedule", "did you mean 'schedule'"), ("stages[1].schedule.decay", "one of"),
                           ("stages[1].replay.ratio", "must be < 1"), ("batch.micro", "required")]:
        assert has(problems, path, fragment), (path, problems)


def test_one_recipe_with_many_cross_field_problems_reports_all_of_them(tmp_path, corpora):
    raw = good_recipe(tmp_path, corpora)
    raw["batch"] = {"micro": 3, "global": 8}
    raw["stages"][1]["name"] = "prose"
    raw["stages"][1]["sources"][0]["path"] = str(tmp_path / "missing.jsonl")
    raw["stages"][0]["schedule"]["min_lr"] = 1.0
    raw["stages"][0]["sources"][0]["from"] = "2020-01-01"
    raw["deepspeed"] = {"train_batch_size": 8}
    raw["stages"][0]["replay"] = {"ratio": 0.5}
    problems = problems_of(tmp_path, raw)
    for path, fragment in [("batch.global", "multiple of batch.micro"), ("stages[1].name", "duplicate stage name"),
                           ("stages[1].sources[0].path", "not found"), ("stages[0].schedule.min_lr", "<= max_lr"),
                           ("stages[0].sources[0].date_field", "required"), ("deepspeed.train_batch_size", "computed"),
                           ("stages[0].replay", "first stage")]:
        assert has(problems, path, fragment), (path, problems)


def test_type_errors_do_not_hide_cross_field_problems(tmp_path, corpora):
    raw = good_recipe(tmp_path, corpora)
    raw["seq_len"] = "long"  # a field-level problem ...
    raw["stages"][1]["sources"][0]["path"] = str(tmp_path / "missing.jsonl")  # ... and a cross-field one
    raw["stages"][1]["name"] = "prose"
    problems = problems_of(tmp_path, raw)
    assert has(problems, "seq_len", "must be an integer")
    assert has(problems, "stages[1].sources[0].path", "not found"), problems
    assert has(problems, "stages[1].name", "duplicate stage name"), problems


def test_replay_ratio_zero_is_allowed(tmp_path, corpora):
    raw = good_recipe(tmp_path, corpora)
    raw["stages"][1]["replay"]["ratio"] = 0.0
    recipe = load_recipe(write_recipe(tmp_path, raw))
    assert recipe.stages[1].replay.ratio == 0.0


def test_stage_shares_of_a_valid_recipe_sum_to_one(tmp_path, corpora):
    raw = good_recipe(tmp_path, corpora)
    _third_stage(raw)
    raw["stages"][2]["replay"] = {"ratio": 0.4}  # from all earlier stages, by their sources' weights
    raw["stages"][2]["sources"][0]["name"] = "de"
    raw["stages"][2]["sources"][0]["path"] = str(corpora["de"])
    recipe = load_recipe(write_recipe(tmp_path, raw))
    assert recipe.replay_stages(2) == ["prose", "code"]
    mix = {c.source: c.share for c in stage_mixture(recipe, 2)}
    assert mix == pytest.approx({"de": 0.6, "en": 0.4 * 2 / 3, "py": 0.4 * 1 / 3})
    for i in range(3):
        assert sum(c.share for c in stage_mixture(recipe, i)) == pytest.approx(1.0)


def _replay_problem_or_sound_mixture(tmp: Path, raw: dict) -> None:
    try:
        recipe = load_recipe(write_recipe(tmp, raw))
    except RecipeError as e:
        assert any(p.startswith("stages[1].replay") for p in e.problems), e.problems
        return
    mixture = stage_mixture(recipe, 1)
    names = [c.source for c in mixture]
    assert len(names) == len(set(names)), mixture
    assert sum(c.share for c in mixture) == pytest.approx(1.0), mixture


def test_replay_from_an_empty_list_is_refused(tmp_path, corpora):
    raw = good_recipe(tmp_path, corpora)
    raw["stages"][1]["replay"]["from"] = []
    _replay_problem_or_sound_mixture(tmp_path, raw)


def test_replay_from_the_same_stage_twice_is_refused(tmp_path, corpora):
    raw = good_recipe(tmp_path, corpora)
    raw["stages"][1]["replay"]["from"] = ["prose", "prose"]
    _replay_problem_or_sound_mixture(tmp_path, raw)


def test_not_a_mapping_and_not_yaml_and_no_file(tmp_path):
    (tmp_path / "list.yaml").write_text("- just\n- a list\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "list.yaml")
    assert info.value.problems == ["recipe: must be a mapping, got list"]

    (tmp_path / "broken.yaml").write_text("name: x\nstages: [\n  {name: a\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "broken.yaml")
    assert len(info.value.problems) == 1 and "not valid YAML" in info.value.problems[0]
    assert "line " in info.value.problems[0]

    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "absent.yaml")
    assert info.value.problems == ["file not found"]


# ---------------------------------------------------------------------------------------------
# strata check


def test_check_on_a_bad_recipe_exits_2_with_every_problem_and_no_traceback(tmp_path, corpora, capsys):
    raw = good_recipe(tmp_path, corpora)
    raw["stages"][1]["sources"][0]["weight"] = 0
    raw["stages"][0]["shedule"] = raw["stages"][0].pop("schedule")
    path = write_recipe(tmp_path, raw, "bad.yaml")
    assert main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "stages[1].sources[0].weight: must be > 0" in err
    assert "stages[0].shedule: unknown key (did you mean 'schedule'?)" in err
    assert str(path) in err
    assert "Traceback" not in out + err


@pytest.mark.parametrize("content", ["name: [unclosed\n", "- a\n- b\n", ""])
def test_check_on_unreadable_recipes_exits_2_without_traceback(tmp_path, capsys, content):
    path = tmp_path / "weird.yaml"
    path.write_text(content)
    assert main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "error:" in err and "Traceback" not in out + err


def test_check_on_a_missing_file_exits_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    out, err = capsys.readouterr()
    assert "nope.yaml" in err and "file not found" in err and "Traceback" not in out + err


def test_check_on_a_good_recipe_prints_each_stage_and_its_steps(tmp_path, corpora, capsys):
    raw = good_recipe(tmp_path, corpora)
    path = write_recipe(tmp_path, raw)
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    tokens_per_step = raw["batch"]["global"] * raw["seq_len"]
    for i, stage in enumerate(raw["stages"]):
        steps = math.ceil(stage["tokens"] / tokens_per_step)
        assert f"stage {i + 1}/{len(raw['stages'])} '{stage['name']}'" in out  # numbered like training
        line = next(ln for ln in out.splitlines() if f"'{stage['name']}'" in ln and "stage" in ln)
        assert f"{steps:,} steps" in line, line
    assert "10 steps (warmup 1)" in out  # warmup 0.1 of 10 steps
    # shares: stage 1 is 75% its own code and 25% replayed prose
    assert "75.0%" in out and "25.0%" in out and "replay of 'prose'" in out
    assert "Traceback" not in out + err


def test_check_warns_when_a_stage_reads_a_source_too_often(tmp_path, corpora, capsys):
    raw = good_recipe(tmp_path, corpora)
    raw["stages"][0]["tokens"] = 10_000_000  # far more than 3 short documents hold
    path = prepared_recipe(tmp_path, raw)
    capsys.readouterr()
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "warning:" in err and "'en'" in err and "max_passes" in err
    assert "passes" in out and "prepared" in out


# ---------------------------------------------------------------------------------------------
# The shipped recipes


def test_there_are_shipped_recipes():
    assert len(DEMO_RECIPES) >= 1


@pytest.mark.parametrize("path", DEMO_RECIPES, ids=[p.name for p in DEMO_RECIPES])
def test_every_shipped_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(path)
    assert recipe.stages and all(stage.sources for stage in recipe.stages)
    for src in recipe.all_sources():
        assert Path(src.path).exists()
    assert Path(recipe.tokenizer).exists()


@pytest.mark.parametrize("path", DEMO_RECIPES, ids=[p.name for p in DEMO_RECIPES])
def test_every_shipped_recipe_validates_from_another_folder(path, tmp_path, monkeypatch):
    # The shipped recipes' paths are relative to the repository root. From elsewhere, loading must
    # still not crash, and the only acceptable problems are the unresolved paths.
    monkeypatch.chdir(tmp_path)
    try:
        load_recipe(path)
    except RecipeError as e:
        assert all(": file or folder not found" in p for p in e.problems), e.problems


# ---------------------------------------------------------------------------------------------
# JSON Schema

SOURCE_KEYS = {"name", "path", "weight", "text_field", "date_field", "from", "to"}
STAGE_KEYS = {"name", "tokens", "sources", "replay", "selection", "expand", "schedule"}
TOP_KEYS = {"name", "seed", "tokenizer", "model", "seq_len", "batch", "deepspeed", "stages"}


def _stage_schema(schema: dict) -> dict:
    return schema["properties"]["stages"]["items"]


def _source_schema(schema: dict) -> dict:
    return _stage_schema(schema)["properties"]["sources"]["items"]


def test_schema_lists_the_fixed_keys_and_forbids_others():
    schema = recipe_schema()
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert TOP_KEYS <= set(schema["properties"])
    assert {"name", "tokenizer", "model", "seq_len", "batch", "stages"} <= set(schema["required"])
    stage = _stage_schema(schema)
    assert STAGE_KEYS <= set(stage["properties"]) and stage["additionalProperties"] is False
    assert {"name", "sources"} <= set(stage["required"])
    source = _source_schema(schema)
    assert SOURCE_KEYS <= set(source["properties"]) and source["additionalProperties"] is False
    assert {"name", "path"} <= set(source["required"])
    assert "from_" not in source["properties"]
    assert set(schema["properties"]["batch"]["properties"]) == {"micro", "global"}
    assert source["properties"]["weight"]["exclusiveMinimum"] == 0
    assert all(prop.get("description") for prop in source["properties"].values())


def test_strata_schema_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "recipe.schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == recipe_schema()
    capsys.readouterr()
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == recipe_schema()
    assert main(["check", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == recipe_schema()


def _json_ready(raw):
    """A YAML-loaded recipe as JSON would hold it: dates become ISO strings."""
    return json.loads(json.dumps(raw, default=lambda v: v.isoformat() if isinstance(v, dt.date) else str(v)))


def _validate(instance, schema: dict, path: str = "") -> list[str]:
    """A small validator for the subset of JSON Schema that recipe_schema() uses."""
    errors: list[str] = []
    if "anyOf" in schema:
        if all(_validate(instance, s, path) for s in schema["anyOf"]):
            errors.append(f"{path}: matches no alternative")
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: not in enum")
    kind = schema.get("type")
    checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "null": lambda v: v is None}
    if kind is not None and not checks[kind](instance):
        return errors + [f"{path}: not {kind}"]
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        if "exclusiveMinimum" in schema and not instance > schema["exclusiveMinimum"]:
            errors.append(f"{path}: <= exclusiveMinimum")
        if "minimum" in schema and not instance >= schema["minimum"]:
            errors.append(f"{path}: < minimum")
        if "exclusiveMaximum" in schema and not instance < schema["exclusiveMaximum"]:
            errors.append(f"{path}: >= exclusiveMaximum")
        if "maximum" in schema and not instance <= schema["maximum"]:
            errors.append(f"{path}: > maximum")
    if kind == "object":
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}.{key}: required")
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                errors += _validate(value, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}.{key}: additional property")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(instance):
            errors += _validate(item, schema["items"], f"{path}[{i}]")
    return errors


@pytest.mark.parametrize("path", DEMO_RECIPES, ids=[p.name for p in DEMO_RECIPES])
def test_shipped_recipes_satisfy_the_schema(path):
    raw = _json_ready(yaml.safe_load(path.read_text()))
    assert _validate(raw, recipe_schema()) == []


def test_schema_rejects_what_the_loader_rejects(tmp_path, corpora):
    raw = _json_ready(good_recipe(tmp_path, corpora))
    assert _validate(raw, recipe_schema()) == []
    bad = copy.deepcopy(raw)
    bad["stages"][0]["shedule"] = bad["stages"][0].pop("schedule")
    bad["stages"][1]["sources"][0]["weight"] = 0
    bad["stages"][1]["schedule"]["decay"] = "cosin"
    del bad["seq_len"]
    errors = _validate(bad, recipe_schema())
    assert any(e.startswith(".stages[0].shedule") for e in errors)
    assert any(e.startswith(".stages[1].sources[0].weight") for e in errors)
    assert any(e.startswith(".stages[1].schedule") for e in errors)  # inside anyOf [schedule, null]
    assert ".seq_len: required" in errors


@pytest.mark.parametrize("path", DEMO_RECIPES, ids=[p.name for p in DEMO_RECIPES])
def test_shipped_recipes_satisfy_the_schema_per_jsonschema(path):
    jsonschema = pytest.importorskip("jsonschema")
    raw = _json_ready(yaml.safe_load(path.read_text()))
    jsonschema.validate(raw, recipe_schema())


def test_a_stage_without_a_name_beside_an_evaluation_stage_map_is_a_recipe_error_not_a_crash(tmp_path):
    from pipeline.recipe.load import evaluation_problems
    from pipeline.recipe.spec import Evaluation

    raw = yaml.safe_load((REPO / "data_recipes" / "demo.yaml").read_text())
    del raw["stages"][1]["name"]
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw, "demo.yaml", REPO / "data_recipes")
    assert "stages[1].name: required" in err.value.problems
    # the harness settings `strata eval --limit/--batch-size/--num-fewshot` may override
    bad = evaluation_problems(Evaluation(limit=-1, batch_size="eight", num_fewshot=-2))
    assert [key for key, _ in bad] == ["batch_size", "limit", "num_fewshot"]
    assert evaluation_problems(Evaluation(limit=0.5, batch_size="auto")) == []
