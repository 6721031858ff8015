"""Decontamination: task items and eval documents planted in a stage's training corpus are
reported as contaminated for that stage and later ones, not before; `decontaminate: drop` scores
the tasks without them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import DEMO, TOKENIZER, demo_docs, write_jsonl

from pipeline.cli import main
from pipeline.data.contamination import contamination, contamination_lines
from pipeline.evaluate.decontaminate import recipe_task_items, record_contamination, task_samples
from pipeline.recipe.load import load_recipe

PLANTED = [3, 7, 11]

RECIPE = """\
name: decon
tokenizer: {tokenizer}
model: {{init: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}}}
seq_len: 64
batch: {{micro: 2, global: 4}}
data: {{dir: {tmp}/data, heldout: 0.0, decontamination: {{warn: 0.05}}}}
evaluation: {{tasks: [{tmp}/task.yaml], limit: 6, batch_size: 4, decontaminate: drop}}
eval:
  - {{name: wiki, path: {tmp}/wiki.jsonl}}
stages:
  - name: first
    schedule: {{max_lr: 1.0e-3}}
    sources: [{{name: german, path: {tmp}/german.jsonl}}]
  - name: second
    schedule: {{max_lr: 1.0e-3}}
    sources: [{{name: code, path: {tmp}/code.jsonl}}]
  - name: third
    schedule: {{max_lr: 1.0e-3}}
    sources: [{{name: more, path: {tmp}/more.jsonl}}]
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Stage `second`'s corpus holds task items 3, 7 and 11 (prompt and answer, inside longer
    documents) and one document of the `wiki` eval set."""
    tmp = tmp_path_factory.mktemp("decon")
    items = [json.loads(line) for line in (DEMO / "tasks" / "continuation_en.jsonl").read_text().splitlines()]
    task = yaml.safe_load((DEMO / "tasks" / "continuation_en.yaml").read_text())
    task.update(task="t_decon_en", dataset_kwargs={"data_files": {"test": str(DEMO / "tasks" / "continuation_en.jsonl")}})
    (tmp / "task.yaml").write_text(yaml.safe_dump(task))
    de = [r["text"][:1200] for r in demo_docs("de", 45)]
    # German too, without the one document that quotes the man-page table task item 0 comes from
    code = [t for t in de[30:] if "8859" not in t]
    wiki = [r["text"][:1200] for r in demo_docs("en", 26)[20:]]
    planted = [f"Some preamble. {items[k]['context']}{items[k]['choices'][items[k]['label']]} And more." for k in PLANTED]
    write_jsonl(tmp / "wiki.jsonl", [{"text": t} for t in wiki])
    write_jsonl(tmp / "german.jsonl", [{"text": t} for t in de[:15]])
    write_jsonl(tmp / "code.jsonl", [{"text": t} for t in code + planted + ["Quoted: " + wiki[2]]])
    write_jsonl(tmp / "more.jsonl", [{"text": t} for t in de[15:30]])
    (tmp / "recipe.yaml").write_text(RECIPE.format(tokenizer=TOKENIZER, tmp=tmp))
    assert main(["prepare", str(tmp / "recipe.yaml"), "--quiet"]) == 0
    return tmp / "recipe.yaml"


def test_planted_items_are_contaminated_from_their_stage_on_and_not_before(prepared, capsys):
    recipe = load_recipe(prepared)
    section = contamination(recipe, recipe_task_items(recipe))
    task = section["sets"]["t_decon_en"]
    assert task["kind"] == "task" and task["items"] == 40
    assert [task["stages"][s]["ids"] for s in ("first", "second", "third")] == [[], PLANTED, PLANTED]
    wiki = section["sets"]["wiki"]
    assert (wiki["kind"], wiki["items"]) == ("eval", 6)
    assert [wiki["stages"][s]["contaminated"] for s in ("first", "second", "third")] == [0, 1, 1]
    lines, warnings = contamination_lines(section)
    assert "t_decon_en           task          40 items  first 0.0% (0) | second 7.5% (3) | third 7.5% (3)" in lines
    assert any("task set 't_decon_en': 7.5% of its items share a 13-word n-gram" in w for w in warnings)


def test_check_shows_the_contamination_of_prepared_data(prepared, tmp_path, capsys):
    no_tasks = tmp_path / "no_tasks.yaml"  # (loading lm-eval's task index costs ~a minute on a busy CPU)
    no_tasks.write_text("\n".join(line for line in prepared.read_text().splitlines() if "tasks:" not in line))
    assert main(["check", str(no_tasks)]) == 0
    out, err = capsys.readouterr()
    assert "wiki                 eval           6 items  first 0.0% (0) | second 16.7% (1) | third 16.7% (1)" in out
    assert "eval set 'wiki': 16.7% of its items share a 13-word n-gram" in err


def test_drop_leaves_contaminated_items_out_of_scoring(prepared, tmp_path):
    recipe = load_recipe(prepared)
    run = tmp_path / "run"
    run.mkdir()
    section = record_contamination(run, recipe)
    assert json.loads((run / "eval.json").read_text())["contamination"] == section
    assert task_samples(recipe, run, "init", ["t_decon_en"]) is None  # nothing trained yet: every item
    assert task_samples(recipe, run, "first", ["t_decon_en"]) is None
    kept = task_samples(recipe, run, "second", ["t_decon_en"])
    assert kept == {"t_decon_en": [0, 1, 2, 4, 5, 6]}  # limit 6 of the clean items
    # the report shows the section, with the warning above data.decontamination.warn
    (run / "recipe.yaml").write_text(prepared.read_text())
    (run / "metrics.jsonl").write_text(json.dumps({"stage": 0, "stage_name": "first", "step": 1, "tokens": 256,
                                                   "loss": 5.0, "lr": 1e-3, "time": 1}) + "\n")
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "## Contamination" in report and "| t_decon_en | task | 40 | 0.0% | 7.5% | 7.5% |" in report
    assert "**Warning**: task set 't_decon_en': 7.5% of its items" in report


def test_sampled_index_is_smaller(prepared, tmp_path):
    from pipeline.data.ngrams import SourceNgrams

    text = prepared.read_text().replace("{warn: 0.05}", "{warn: 0.05, sample: 8}").replace(
        f"{prepared.parent}/data", f"{tmp_path}/data8")
    (tmp_path / "r8.yaml").write_text(text)
    assert main(["prepare", str(tmp_path / "r8.yaml"), "--quiet"]) == 0
    full = SourceNgrams.read(prepared.parent / "data" / "code").index
    sampled = SourceNgrams.read(tmp_path / "data8" / "code").index
    assert 0.05 < len(sampled) / len(full) < 0.25
    assert set(sampled.tolist()) <= set(full.tolist())
