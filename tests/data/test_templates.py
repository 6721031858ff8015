"""Templates: semi-structured records rendered to text with Jinja2 (sandboxed, strict), in every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import recipe_dict, write_jsonl, write_recipe

from pipeline.cli import main
from pipeline.data.sources import ReadStats, read_documents
from pipeline.errors import DataError, RecipeError
from pipeline.recipe.load import parse_recipe
from pipeline.recipe.spec import Source

PRODUCT = ("{{ item.title }}{% if price is defined %} costs {{ price }} EUR{% endif %}.\n"
           "Tags: {{ tags | join(', ') }}")
RECORDS = [
    {"item": {"title": "Wool socks"}, "price": 9.5, "tags": ["winter", "wool"]},
    {"item": {"title": "Tea kettle"}, "tags": ["kitchen"]},  # optional price absent
    {"item": {"name": "no title"}, "tags": []},  # the template needs item.title: malformed
    {"item": {"title": "Desk lamp"}, "price": 31.5, "tags": ["office", "light"]},
]
RENDERED = ["Wool socks costs 9.5 EUR.\nTags: winter, wool", "Tea kettle.\nTags: kitchen",
            "Desk lamp costs 31.5 EUR.\nTags: office, light"]


def read(path: Path, **kwargs) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    return list(read_documents(Source(name="shop", path=str(path), **kwargs), stats)), stats


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_hf(path: Path, records: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "parquet", "hf"])
def test_template_renders_nested_fields_lists_and_optional_fields_in_every_format(tmp_path, fmt):
    if fmt == "parquet":
        path = write_parquet(tmp_path / "shop.parquet", RECORDS)
    elif fmt == "hf":
        path = write_hf(tmp_path / "shop_hf", RECORDS)
    else:
        path = write_jsonl(tmp_path / f"shop.{fmt}", RECORDS, compress=fmt.endswith("zst"))
    docs, stats = read(path, template=PRODUCT)
    assert docs == RENDERED
    assert stats.documents == 3 and stats.skipped_total == 1
    [(file, entry)] = stats.skipped.items()
    [(reason, where)] = entry["reasons"].items()
    assert "template failed" in reason and "title" in reason and where["lines"] == [3]


def test_failing_record_is_fatal_with_on_error_fail(tmp_path):
    path = write_jsonl(tmp_path / "shop.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"shop\.jsonl:3: template failed .*title.*on_error: fail"):
        read(path, template=PRODUCT, on_error="fail")


def test_sandbox_refuses_python_internals(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    docs, stats = read(path, template="{{ text.__class__.__mro__[1].__subclasses__() }}")
    assert docs == [] and "SecurityError" in json.dumps(stats.skipped)


def test_key_value_and_json_formats_render_every_field(tmp_path):
    records = [{"title": "Wool socks", "price": 9.5, "tags": ["winter", "wool"], "note": None},
               {"title": "Kettle", "specs": {"volume_l": 1.7}}]
    path = write_jsonl(tmp_path / "shop.jsonl", records)
    kv, _ = read(path, format="key_value")
    assert kv == ['title: Wool socks\nprice: 9.5\ntags: ["winter", "wool"]', 'title: Kettle\nspecs: {"volume_l": 1.7}']
    as_json, _ = read(path, format="json")
    assert json.loads(as_json[0]) == {k: v for k, v in records[0].items() if k != "note"}  # null = absent
    assert as_json[1] == '{"title":"Kettle","specs":{"volume_l":1.7}}'


def test_bad_template_and_template_with_format_are_errors_by_key(tmp_path):
    path = write_jsonl(tmp_path / "shop.jsonl", RECORDS)
    stage = {"name": "shop", "schedule": {"max_lr": 1e-3},
             "sources": [{"name": "shop", "path": str(path), "template": "{{ item.title }"},
                         {"name": "kv", "path": str(path), "template": "{{ x }}", "format": "json"}]}
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe_dict(tmp_path, [stage]), "r.yaml")
    text = str(e.value)
    assert "stages[0].sources[0].template: not a valid Jinja2 template (line 1:" in text
    assert "stages[0].sources[1].format: give template or format, not both" in text


def shop_recipe(tmp_path: Path) -> dict:
    """A one-stage recipe whose source is RECORDS rendered with PRODUCT."""
    path = write_jsonl(tmp_path / "shop.jsonl", RECORDS)
    return recipe_dict(tmp_path, [{"name": "shop", "tokens": 1024, "schedule": {"max_lr": 1e-3},
                                   "sources": [{"name": "shop", "path": str(path), "template": PRODUCT}]}])


def test_check_shows_a_rendered_example_and_counts_failures(tmp_path, capsys):
    assert main(["check", str(write_recipe(tmp_path, shop_recipe(tmp_path)))]) == 0
    out, err = capsys.readouterr()
    assert "shop: 1 of the first 4 record(s) failed to render or were malformed" in out
    assert "Wool socks costs 9.5 EUR.\n    Tags: winter, wool" in out
    assert "line 3" in err


def test_changing_the_template_prepares_the_source_again(tmp_path, capsys):
    recipe = shop_recipe(tmp_path)
    assert main(["prepare", str(write_recipe(tmp_path, recipe)), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "data" / "shop" / "manifest.json").read_text())
    assert manifest["documents"] == 3 and manifest["skipped_total"] == 1
    recipe["stages"][0]["sources"][0]["template"] = "{{ item.title }}"
    assert main(["prepare", str(write_recipe(tmp_path, recipe)), "--quiet"]) == 0
    assert "prepared" in capsys.readouterr().out.splitlines()[-1]
    manifest = json.loads((tmp_path / "data" / "shop" / "manifest.json").read_text())
    assert manifest["documents"] == 3 and manifest["tokens"] < 20
