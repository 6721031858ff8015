"""Recipes are YAML 1.2 (core schema): only true/false are booleans, whatever PyYAML's YAML 1.1 says."""

from __future__ import annotations

import pytest
from conftest import small_corpus

from pipeline.errors import RecipeError
from pipeline.recipe.load import load_recipe
from pipeline.recipe.yaml_file import read_yaml


def two_stage_yaml(tmp_path, second_source: str, distill: str) -> str:
    en, py = small_corpus(tmp_path, "en", 3, chars=300), small_corpus(tmp_path, "code", 3, chars=300)
    return f"""\
name: yaml12
tokenizer: tokenizers/demo.model
model:
  init: {{hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}
seq_len: 64
batch: {{micro: 2, global: 8}}
data: {{dir: {tmp_path / 'data'}}}
stages:
  - name: general
    tokens: 1_000_000
    sources: [{{name: en, path: {en}}}]
    schedule: {{max_lr: 1e-3, min_lr: 1.0e-4}}
  - name: code
    tokens: 2e5
    sources: [{{name: {second_source}, path: {py}}}]
    replay: {{ratio: 0.1}}
    distill: {distill}
    schedule: {{max_lr: 5.0e-4}}
"""


def test_the_readme_distillation_example_with_on_replay_loads(tmp_path, monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)
    path = tmp_path / "r.yaml"
    path.write_text(two_stage_yaml(tmp_path, "no", "{teacher: previous, weight: 1.0, temperature: 2.0, on: replay}"))
    recipe = load_recipe(path)
    assert recipe.stages[1].distill.on == "replay"  # YAML 1.1 reads the key `on` as True
    assert recipe.stages[1].sources[0].name == "no"  # ...and the name `no` as False
    assert recipe.stages[0].tokens == 1_000_000 and recipe.stages[1].tokens == 200_000
    assert recipe.stages[0].schedule.max_lr == 1e-3


@pytest.mark.parametrize(("text", "expected"), [
    ("[yes, no, on, off, y, n, Yes, NO]", ["yes", "no", "on", "off", "y", "n", "Yes", "NO"]),
    ("[true, True, TRUE, false, False, FALSE]", [True, True, True, False, False, False]),
    ("[010, 0o17, 0x1f, -3, +4]", [10, 15, 31, -3, 4]),
    ("[1e-3, 2.5, .5, -.inf]", [1e-3, 2.5, 0.5, float("-inf")]),
    ("[~, null, 2024-01-01, 1_000]", [None, None, "2024-01-01", "1_000"]),
])
def test_scalars_follow_the_yaml_1_2_core_schema(tmp_path, text, expected):
    path = tmp_path / "s.yaml"
    path.write_text(f"x: {text}\n")
    assert read_yaml(path)["x"] == expected


def test_a_yaml_error_still_names_line_and_column_and_a_repeat_both_lines(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages: [\n  {name: a\n")
    with pytest.raises(RecipeError, match=r"line \d+, column \d+: not valid YAML"):
        read_yaml(path)
    path.write_text("name: x\nseed: 1\non: 2\nseed: 3\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:4: duplicate key 'seed' \(first at line 2\)"):
        read_yaml(path)
