"""The recipe reference of docs/recipe.md: generated from the recipe dataclasses, never stale."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from pipeline.cli import main
from pipeline.recipe.reference import BEGIN, END, reference_markdown, with_reference
from pipeline.recipe.spec import Recipe
from pipeline.recipe.typed_yaml import config_fields

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "recipe.md"


def test_docs_recipe_md_holds_the_reference_the_dataclasses_generate():
    text = PAGE.read_text()
    assert with_reference(text, str(PAGE)) == text, (
        "docs/recipe.md is stale: run `strata schema --markdown --out docs/recipe.md` and commit it")


def _dataclasses(tp: object, found: list) -> list:
    """Every dataclass reachable from `tp` through the recipe's type hints, each once."""
    if dataclasses.is_dataclass(tp) and tp not in found:
        found.append(tp)
        for hint in typing.get_type_hints(tp).values():
            _dataclasses(hint, found)
    for arg in typing.get_args(tp):
        _dataclasses(arg, found)
    return found


def test_every_recipe_key_has_a_help_text_and_a_row_in_the_reference():
    reference = reference_markdown()
    classes = _dataclasses(Recipe, [])
    assert len(classes) >= 15  # Recipe, Model, ModelInit, Batch, Stage, Source, Schedule, ...
    for cls in classes:
        for f in config_fields(cls):
            key = f.metadata.get("key") or f.name
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help= text"
            assert f"| `{key}` |" in reference, f"{cls.__name__}.{key} has no row"


def test_the_reference_shows_types_bounds_defaults_and_where_a_mapping_is_described():
    reference = reference_markdown()
    assert "| `heldout` | number, >= 0, < 0.5 | `0.01` |" in reference
    assert "| `decay` | `cosine` \\| `linear` \\| `constant` \\| `wsd` | `cosine` |" in reference
    assert "| `stages` | list of mappings (`stages[]`) | **required** |" in reference
    assert "| `eval` | list of mappings (`stages[].sources[]`) | `[]` |" in reference  # described once
    assert "### `stages[].sources[]`" in reference and reference.count("### `stages[].sources[]`") == 1
    assert "model.embed_tokens.\\*" in reference  # a glob in a help text is not Markdown emphasis


def test_strata_schema_markdown_rewrites_only_the_generated_section(tmp_path, capsys):
    page = tmp_path / "recipe.md"
    page.write_text(f"# Mine\n\nprose before\n\n{BEGIN}\nold table\n{END}\n\nprose after\n")
    assert main(["schema", "--markdown", "--out", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Mine\n\nprose before\n\n") and text.endswith(f"{END}\n\nprose after\n")
    assert "old table" not in text and reference_markdown() in text
    assert main(["schema", "--markdown"]) == 0
    assert capsys.readouterr().out.endswith(reference_markdown())


def test_a_page_with_a_broken_generated_section_is_one_error_naming_it(tmp_path, capsys):
    page = tmp_path / "recipe.md"
    page.write_text(f"# Mine\n\n{BEGIN}\nno end marker\n")
    assert main(["schema", "--markdown", "--out", str(page)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(page) in err and "END recipe keys" in err
    assert page.read_text() == f"# Mine\n\n{BEGIN}\nno end marker\n"  # untouched
