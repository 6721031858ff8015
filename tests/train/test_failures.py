"""Failure drills through the command line: signals, NaN losses, SIGKILL at awkward moments, a full
disk during a checkpoint write, a checkpoint from another model. Each run is one process on CPU
with a tiny model; the faults come from the STRATA_TEST_FAULT hook (pipeline/train/failures.py).

Every drill ends the same way: the run resumes and its per-step metrics equal those of a run that
was never interrupted, or it stops with one clear `error:` line and its last checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    general_then_code,
    prepared_recipe,
    recipe_dict,
    step_metrics,
    strata,
    train_here,
    write_recipe,
)

from pipeline.cli import main
from pipeline.train.failures import EXIT_INTERRUPTED

STEPS = (4, 3)  # two stages; 8 sequences of 64 tokens per step, 4 micro-batches of 2


def latest(run_dir: Path) -> str:
    return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # (an unfinished progress bar may precede the error on its terminal line)
    return [line[line.index("error: "):] for line in proc.stderr.splitlines() if "error: " in line]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("corpus")
    raw = recipe_dict(tmp, general_then_code(tmp, STEPS, docs=12), checkpoint={"every": 2, "keep": 2},
                      deepspeed={"zero_stage": 1}, train={"max_bad_steps": 2})
    path = prepared_recipe(tmp, raw)
    return path


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train_here(recipe, run_dir)
    return run_dir


def test_dry_run_prints_the_launch_arithmetic_and_deepspeed_config(recipe, capsys, tmp_path):
    assert main(["train", str(recipe), "--dry-run", "--world-size", "2", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "world size        2 (--world-size)" in out
    assert "accumulation      2 micro-batch(es)" in out
    assert "stage 1 'general'" in out and f"{STEPS[0]} steps" in out and f"{STEPS[1]} steps" in out
    config = json.loads(out[out.index("{"):])
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"], config["zero_optimization"]["stage"]) == (8, 2, 2, 1)
    assert not (tmp_path / "r").exists()  # nothing trained, no run folder
    assert main(["train", str(recipe), "--dry-run", "--world-size", "3"]) == 1  # 8 % (2 x 3): one error line
    assert "batch.global (8) must be a multiple" in capsys.readouterr().err


def test_a_kill_mid_step_then_a_sigterm_resume_to_the_same_losses(recipe, reference, tmp_path):
    """One run stopped twice: SIGKILL in the middle of step 3 (it resumes from step 2), then, once
    resumed, SIGTERM after step 3 (a checkpoint off the every-2 cadence, exit 75); the run resumed
    after both has the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    strata(["train", recipe, "--run-dir", run_dir], fault="kill@1:3:mid", expect=-9)
    assert latest(run_dir) == "s01-step000002"
    proc = strata(["train", recipe, "--run-dir", run_dir], fault="sigterm@1:3", expect=EXIT_INTERRUPTED)
    assert "resuming at step 2 from s01-step000002" in proc.stdout
    assert "stopped by SIGTERM after step 3 of stage 1 'general'" in proc.stdout
    assert latest(run_dir) == "s01-step000003"  # an extra mid-stage checkpoint, off the every-2 cadence
    assert "Traceback" not in proc.stderr
    proc = strata(["train", recipe, "--run-dir", run_dir])
    assert "resuming at step 3 from s01-step000003" in proc.stdout
    assert step_metrics(run_dir) == step_metrics(reference)


def test_nan_loss_skips_the_step_and_consecutive_ones_stop_with_the_last_checkpoint_intact(recipe, reference, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    raw["checkpoint"] = {"every": 1, "keep": 8}  # a checkpoint after every step, to look at the weights
    every_step = write_recipe(tmp_path, raw, name="every-step.yaml")
    run_dir = tmp_path / "run"
    # Step 2 of stage 1 is NaN once (skipped, counted, training goes on); steps 1-2 of stage 2: stop.
    proc = strata(["train", every_step, "--run-dir", run_dir], fault="nan@1:2,nan@2:1-2", expect=1)
    assert "stage 1 'general' step 2: the loss is not finite; optimizer step skipped (1 in a row, 1 in this run)" in proc.stdout
    assert "stage 2 'code' step 2: the loss is not finite; optimizer step skipped (2 in a row, 3 in this run)" in proc.stdout
    errors = error_lines(proc)
    assert len(errors) == 1 and "NaN/inf for 2 consecutive steps (1-2, train.max_bad_steps = 2)" in errors[0]
    assert latest(run_dir) == "s02-step000001"  # nothing was saved for the step that stopped the run
    rows = step_metrics(run_dir)
    assert rows[0] == step_metrics(reference)[0]
    assert [r["loss"] != r["loss"] for r in rows] == [False, True, False, False, True, True]  # NaN logged

    def weights(tag):
        path = run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt"
        return torch.load(path, weights_only=True)["module"]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # A skipped step leaves the weights alone; a good one moves them.
    assert same(weights("s01-step000001"), weights("s01-step000002"))
    assert not same(weights("s01-step000002"), weights("s01-step000003"))
    assert same(weights("s01-end"), weights("s02-step000001"))
    assert all(torch.isfinite(w).all() for w in weights("s02-step000001").values())


def test_out_of_disk_during_a_checkpoint_write_is_one_error_and_the_previous_checkpoint_resumes(recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = strata(["train", recipe, "--run-dir", run_dir], fault="disk-full@s01-end", expect=None)
    assert proc.returncode == 1
    errors = error_lines(proc)
    assert len(errors) == 1
    assert "s01-end: cannot write the checkpoint (No space left on device)" in errors[0]
    assert "the last good checkpoint s01-step000002 is intact" in errors[0]
    assert latest(run_dir) == "s01-step000002"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_checkpoint_from_another_model_is_one_clear_error(recipe, reference, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["init"]["hidden_size"] = 32
    raw["model"]["init"]["intermediate_size"] = 64
    other = write_recipe(tmp_path, raw, name="narrow.yaml")
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")  # no run.json: only the weights disagree
    pointer = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({**pointer, "tag": "s01-end", "stage": 0}))
    proc = strata(["train", other, "--run-dir", run_dir], expect=1)
    errors = error_lines(proc)
    assert len(errors) == 1
    assert "s01-end: saved from a different model than the recipe builds (size mismatch for" in errors[0]
