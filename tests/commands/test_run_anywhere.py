"""A run folder is usable from anywhere, and a launch that cannot work fails before any work."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from conftest import TOKENIZER, recipe_dict, small_corpus, strata

from pipeline.cli import main


@pytest.mark.slow
def test_eval_works_from_any_directory_with_the_raw_sources_gone(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    small_corpus(work, "en", 30)
    raw = recipe_dict(work, [{"name": "general", "tokens": 8 * 64 * 3, "schedule": {"max_lr": 1e-3},
                              "sources": [{"name": "en", "path": "en.jsonl.zst"}]}],  # relative, as users write
                      tokenizer=str(TOKENIZER), data={"heldout": 0.1}, checkpoint={"every": 0})
    (work / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    plain = {"STRATA_PROGRESS_INTERVAL": "0"}  # (also: without a terminal, progress is plain lines with an ETA)
    prepared = strata(["prepare", "recipe.yaml"], cwd=work, env=plain)
    trained = strata(["train", "recipe.yaml", "--run-dir", "run"], cwd=work, env=plain)
    for proc in (prepared, trained):
        assert "\r" not in proc.stdout + proc.stderr  # no tqdm frames in a log file
    assert re.search(r"^prepare en: [\d.]+k?/[\d.]+k? B \(\d+%\), .* B/s, elapsed ", prepared.stdout, re.M)
    assert re.search(r"^stage 1/1 general: 2/3 step \(67%\), [\d.]+ (step/s|s/step), elapsed 0:00:\d\d, ETA 0:00:\d\d$",
                     trained.stdout, re.M), trained.stdout
    run = work / "run"
    evaluated = json.loads((run / "eval.json").read_text())
    (run / "eval.json").unlink()
    shutil.move(work / "en.jsonl.zst", tmp_path / "moved.jsonl.zst")  # the raw corpus is gone; shards remain
    proc = strata(["eval", run], cwd=elsewhere)
    assert "evaluated: init, general" in proc.stdout
    again = json.loads((run / "eval.json").read_text())
    assert again["loss"]["general"] == evaluated["loss"]["general"]
    assert (run / "recipe.yaml").read_text() == (work / "recipe.yaml").read_text()  # as written, for the hash


@pytest.mark.slow
def test_a_batch_that_does_not_divide_under_torchrun_fails_before_any_work_with_one_error_line(tmp_path):
    raw = recipe_dict(tmp_path, [{"name": "general", "tokens": 8 * 64, "schedule": {"max_lr": 1e-3},
                                  "sources": [{"name": "en", "path": str(small_corpus(tmp_path, "en", 3))}]}])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    proc = strata(["train", tmp_path / "r.yaml", "--run-dir", tmp_path / "run"], nproc=3, expect=None, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {tmp_path / 'r.yaml'}: batch.global (8) must be a multiple of batch.micro x world "
                      "size (2 x 3 = 6)"], proc.stderr[-3000:]  # three ranks refuse; rank 0 alone prints
    assert not (tmp_path / "run").exists()  # no lock, no run.json, no initial evaluation


def test_check_warns_when_a_token_budget_is_smaller_than_one_step(tmp_path, capsys):
    raw = recipe_dict(tmp_path, [{"name": "tiny", "tokens": 100, "schedule": {"max_lr": 1e-3},
                                  "sources": [{"name": "en", "path": str(small_corpus(tmp_path, "en", 3))}]}])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["check", str(tmp_path / "r.yaml")]) == 0
    out, err = capsys.readouterr()
    assert "stage 1/1 'tiny'" in out
    assert "warning: stages[0].tokens: 100 is less than one step (512 tokens = batch.global x seq_len)" in err
