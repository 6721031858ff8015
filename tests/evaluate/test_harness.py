"""Downstream tasks with lm-evaluation-harness after every stage (pipeline/evaluate/harness.py).

The slow tests share one tiny two-stage run (one process) whose recipe names two local
multiple-choice tasks built like the demo's (true continuation among four), limited to a few
examples: the harness runs on the initial model and after each stage, eval.json and the report
hold the scores, lm-eval's own CLI on a stage's export gives the same numbers, and `strata eval
--tasks` fills in only what is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DEMO, REPO, general_then_code, recipe_dict, strata, write_recipe

from pipeline.cli import main
from pipeline.evaluate import harness
from pipeline.recipe.load import load_recipe

LIMIT = 6  # examples per task: seconds per evaluation on CPU
BATCH = 4


def task_yaml(folder: Path, domain: str, data: Path | None = None) -> Path:
    """A local lm-eval task over the demo's continuation items of `domain`, data by absolute path."""
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((DEMO / "tasks" / f"continuation_{domain}.yaml").read_text())
    config["task"] = f"t_continuation_{domain}"
    config["dataset_kwargs"]["data_files"]["test"] = str(data or DEMO / "tasks" / f"continuation_{domain}.jsonl")
    path = folder / f"continuation_{domain}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tasks_recipe(tmp: Path, tasks: list[Path], heldout: float = 0.0, **evaluation) -> Path:
    raw = recipe_dict(tmp, general_then_code(tmp, (3, 2), docs=12), checkpoint={"every": 0},
                      train={"eval_tokens": 256},
                      evaluation={"tasks": [str(t) for t in tasks], "limit": LIMIT, "batch_size": BATCH,
                                  **evaluation})
    raw["data"]["heldout"] = heldout
    return write_recipe(tmp, raw)


# ------------------------------------------------------------------------------------------------
# strata check


def test_check_refuses_a_task_file_that_cannot_be_loaded(tmp_path, capsys):
    malformed = tmp_path / "tasks" / "malformed.yaml"
    malformed.parent.mkdir()
    malformed.write_text("task: [unclosed\n")
    no_data = task_yaml(tmp_path / "tasks", "en", data=tmp_path / "missing.jsonl")
    good = task_yaml(tmp_path / "good", "code")
    recipe = tasks_recipe(tmp_path, [good, malformed, no_data], stage={"t_continuation_code": "code"})
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "evaluation.tasks[1]: " in err and "malformed.yaml: not a readable task YAML" in err
    assert "evaluation.tasks[2]: task 't_continuation_en' cannot be loaded (offline)" in err and "missing.jsonl" in err


def test_check_refuses_tasks_without_lm_eval_with_the_install_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "harness_installed", lambda: False)
    recipe = tasks_recipe(tmp_path, [task_yaml(tmp_path / "tasks", "en")])
    assert main(["check", str(recipe)]) == 2
    assert "lm-evaluation-harness is not installed: pip install 'strata-cpt[harness]'" in capsys.readouterr().err


def test_recipe_evaluation_block_is_validated_by_key_path(tmp_path):
    recipe = tasks_recipe(tmp_path, [tmp_path / "nope.yaml"], batch_size="big", limit=2.5,
                          stage={"x": "cod"})
    with pytest.raises(Exception) as e:
        load_recipe(recipe)
    text = str(e.value)
    assert "evaluation.tasks[0]: file or folder not found" in text
    assert "evaluation.batch_size: must be a whole number > 0 or auto, got 'big'" in text
    assert "evaluation.limit: must be a fraction < 1 or a whole number" in text
    assert "evaluation.stage.x: unknown stage 'cod' (did you mean 'code'?)" in text


def test_demo_recipe_tasks_load_offline():
    assert harness.task_problems(load_recipe(REPO / "data_recipes" / "demo.yaml")) == []


# ------------------------------------------------------------------------------------------------
# A tiny two-stage run with tasks


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harness")
    tasks = tmp / "tasks"
    recipe = tasks_recipe(tmp, [task_yaml(tasks, "en"), task_yaml(tasks, "code")],
                          heldout=0.3, stage={"t_continuation_en": "general", "t_continuation_code": "code"})
    assert main(["prepare", str(recipe), "--quiet"]) == 0
    run_dir = tmp / "run"
    proc = strata(["train", recipe, "--run-dir", run_dir], nproc=1, cwd=tmp)  # outside any git repository
    (tmp / "train-output.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


@pytest.mark.slow
def test_train_output_has_no_harness_progress_bars_and_no_git_noise(run):
    out = (run.parent / "train-output.txt").read_text()
    assert "tasks general: t_continuation_en acc" in out  # the one line Strata prints per evaluation
    assert "fatal: not a git repository" not in out
    assert "it/s]" not in out and "Running loglikelihood requests" not in out  # tqdm bars: lm-eval's, datasets',
    # and transformers' "Writing model shards" of each export


@pytest.mark.slow
def test_tasks_are_evaluated_after_every_stage_into_eval_json_and_the_report(run):
    section = json.loads((run / "eval.json").read_text())["tasks"]
    assert section["evaluations"] == ["init", "general", "code"]
    assert [(t["name"], t["stage"]) for t in section["tasks"]] == [
        ("t_continuation_en", "general"), ("t_continuation_code", "code")]
    for evaluation in section["evaluations"]:
        for task in ("t_continuation_en", "t_continuation_code"):
            r = section["results"][evaluation][task]
            assert r["samples"] == LIMIT and set(r["metrics"]) == {"acc", "acc_norm"}
            for m in r["metrics"].values():
                assert m["value"] * LIMIT == pytest.approx(round(m["value"] * LIMIT))  # a share of LIMIT items
                assert m["stderr"] is not None and m["higher_is_better"] is True
    acc = {e: [section["results"][e][t]["metrics"]["acc"]["value"] for t in ("t_continuation_en", "t_continuation_code")]
           for e in section["evaluations"]}
    cl = section["metrics"]["acc"]
    assert cl["AA"]["general"] == pytest.approx(acc["general"][0])  # only en is seen after general
    assert cl["AA"]["code"] == pytest.approx(sum(acc["code"]) / 2)
    assert cl["BWT"]["code"] == pytest.approx(acc["code"][0] - acc["general"][0])
    assert cl["FWD"]["code"] == pytest.approx(acc["general"][1] - acc["init"][1])
    heldout = json.loads((run / "eval.json").read_text())  # the held-out sections are still there
    assert heldout["evaluations"] == ["init", "general", "code"] and set(heldout["loss"]["code"]) == {"en", "py"}
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "## Downstream tasks (lm-evaluation-harness)" in report
    assert "| after | t_continuation_en (general) | t_continuation_code (code) |" in report
    code_acc = section["results"]["code"]["t_continuation_code"]["metrics"]["acc"]
    assert f"{code_acc['value']:.4f} ± {code_acc['stderr']:.4f}" in report
    assert (run / "task_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_stage_scores_equal_lm_eval_cli_on_the_stage_export(run, tmp_path):
    section = json.loads((run / "eval.json").read_text())["tasks"]
    export = run / "stages" / "01-general" / "hf"
    tasks = run.parent / "tasks"
    cli = Path(sys.executable).parent / "lm_eval"  # max_length: Strata scores at the recipe's seq_len (64)
    proc = subprocess.run(
        [str(cli), "--model", "hf", "--model_args", f"pretrained={export},dtype=float32,max_length=64", "--device", "cpu",
         "--tasks", "t_continuation_en,t_continuation_code", "--include_path", str(tasks), "--limit", str(LIMIT),
         "--batch_size", str(BATCH), "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={"PATH": str(cli.parent), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = tmp_path.glob("out/**/results_*.json")
    theirs = json.loads(out.read_text())["results"]
    for task in ("t_continuation_en", "t_continuation_code"):
        ours = section["results"]["general"][task]["metrics"]
        for metric in ("acc", "acc_norm"):
            assert ours[metric]["value"] == pytest.approx(theirs[task][f"{metric},none"], abs=1e-12)
            assert ours[metric]["stderr"] == pytest.approx(theirs[task][f"{metric}_stderr,none"], abs=1e-12)


@pytest.mark.slow
def test_eval_tasks_on_a_finished_run_fills_in_only_what_is_missing(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    doc = json.loads((copy / "eval.json").read_text())
    results = doc["tasks"]["results"]
    before = results["code"]["t_continuation_en"]["metrics"]["acc"]["value"]
    results["general"]["t_continuation_en"]["metrics"]["acc"]["value"] = 0.123  # present: must not be recomputed
    del results["code"]["t_continuation_en"]  # missing: must be recomputed
    (copy / "eval.json").write_text(json.dumps(doc))
    de = task_yaml(run.parent / "tasks_de", "de")  # a task the recipe did not name
    en = run.parent / "tasks" / "continuation_en.yaml"
    assert main(["eval", str(copy), "--tasks", str(en), str(de), "--limit", str(LIMIT),
                 "--batch-size", str(BATCH)]) == 0
    assert "evaluated: init, general, code" in capsys.readouterr().out  # de everywhere, en after code
    after = json.loads((copy / "eval.json").read_text())["tasks"]
    assert after["results"]["general"]["t_continuation_en"]["metrics"]["acc"]["value"] == 0.123
    assert after["results"]["code"]["t_continuation_en"]["metrics"]["acc"]["value"] == before
    assert all("t_continuation_de" in after["results"][e] for e in ("init", "general", "code"))
    assert "t_continuation_code" in after["results"]["code"]  # the recipe's other task is kept
    assert main(["eval", str(copy), "--tasks", str(en), str(de), "--limit", str(LIMIT),
                 "--batch-size", str(BATCH)]) == 0
    assert "evaluated: nothing new" in capsys.readouterr().out
