"""eval.json has several writers (`strata train` after each stage, `strata eval` on the same run
folder, the held-out and the task sections): none may lose another's results.

The failure drill this guards: `strata eval RUN --tasks ...` started while the run trained kept
its own stale copy of eval.json and wrote it back after the trainer had added a stage, deleting
that stage's results. Every write now re-reads the file under a lock and merges.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluate.harness import Task, TaskResults
from pipeline.evaluate.heldout import Domain, DomainData, EvalFile
from pipeline.recipe.load import load_recipe
from pipeline.recipe.spec import Recipe

RECIPE = """\
name: writers
tokenizer: {tokenizer}
model: {{init: {{hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}}}
seq_len: 64
batch: {{micro: 2, global: 8}}
stages:
  - name: general
    tokens: 4096
    sources: [{{name: en, path: en.jsonl}}]
    schedule: {{max_lr: 1.0e-3}}
  - name: code
    tokens: 4096
    sources: [{{name: py, path: py.jsonl}}]
    schedule: {{max_lr: 1.0e-3}}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Recipe:
    from conftest import TOKENIZER

    for name in ("en", "py"):
        (tmp_path / f"{name}.jsonl").write_text('{"text": "a b c"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(tokenizer=TOKENIZER))
    return load_recipe(path)


def domains() -> list[tuple[Domain, DomainData]]:
    return [(Domain(name, i, ("heldout",)), DomainData(np.zeros(9, dtype=np.int64), 0, f"fp-{name}"))
            for i, name in enumerate(("en", "py"))]


def result(loss: float, name: str) -> dict:
    return {"loss": loss, "perplexity": float(np.exp(loss)), "accuracy": 0.5, "tokens": 8, "fingerprint": f"fp-{name}"}


def test_a_writer_with_a_stale_copy_keeps_the_results_another_wrote_since(recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    trainer, evaluator = EvalFile(run), EvalFile(run)  # both read eval.json before either writes
    trainer.add("general", {"en": result(2.0, "en"), "py": result(3.0, "py")})
    trainer.write(recipe, domains())
    tasks = TaskResults(run)
    tasks.add("general", {"t": {"metrics": {"acc": {"value": 0.5, "stderr": 0.1, "higher_is_better": True}},
                                "samples": 4, "fingerprint": "x"}})
    tasks.write(recipe, [Task("t", None, 0)])
    trainer.add("code", {"en": result(2.5, "en"), "py": result(1.0, "py")})
    trainer.write(recipe, domains())
    evaluator.add("init", {"en": result(4.0, "en"), "py": result(4.0, "py")})  # strata eval, stale since the start
    evaluator.write(recipe, domains())

    doc = json.loads((run / "eval.json").read_text())
    assert doc["evaluations"] == ["init", "general", "code"]
    assert doc["loss"]["code"] == {"en": 2.5, "py": 1.0} and doc["loss"]["init"]["en"] == 4.0
    assert doc["metrics"]["loss"]["AA"]["code"] is not None  # computed over the merged rows
    assert doc["tasks"]["results"]["general"]["t"]["samples"] == 4  # the task section survived too


def _write_many(run: str, recipe_path: str, domain: str, count: int) -> None:
    recipe = load_recipe(recipe_path)
    file = EvalFile(Path(run))  # one long-lived object per process, as a trainer holds
    for i in range(count):
        file.add(("general", "code")[i % 2], {domain: result(float(i), domain)})
        file.write(recipe, domains())


def test_two_processes_writing_at_once_both_keep_every_result(recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    count = 40
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(run), recipe.file, name, count)) for name in ("en", "py")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    loss = json.loads((run / "eval.json").read_text())["loss"]
    # each process's last value for each stage is on disk: no write lost the other's
    assert loss == {"general": {"en": count - 2.0, "py": count - 2.0}, "code": {"en": count - 1.0, "py": count - 1.0}}
