"""The trainer end to end under torchrun on CPU: stages, exports, and exact resume after SIGKILL.

One uninterrupted 2-process run is the reference; every interrupted run must reproduce its
per-step metrics. Kills use the STRATA_KILL_AFTER test hook ("STAGE:STEP"), which sends SIGKILL
to every rank right after that step (and whatever checkpoint that step writes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import general_then_code, prepared_recipe, recipe_dict, step_metrics, strata, write_recipe

from pipeline.recipe.load import load_recipe
from pipeline.recipe.schedule import StageSchedule

pytestmark = pytest.mark.slow

STEPS = (6, 5)  # steps of the two stages: 8 sequences x 64 tokens per step


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("corpus")
    sched = {"warmup": 2, "max_lr": 3e-3, "min_lr": 3e-4, "decay": "cosine"}
    stages = general_then_code(tmp, STEPS, docs=20, schedule=sched,
                               code_schedule={**sched, "max_lr": 2e-3, "decay": "wsd"})
    raw = recipe_dict(tmp, stages, checkpoint={"every": 2, "keep": 2}, deepspeed={"zero_stage": 1})
    path = prepared_recipe(tmp, raw)
    return path


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    strata(["train", recipe, "--run-dir", run_dir], nproc=2)
    return run_dir


def test_two_process_run_writes_checkpoints_exports_and_manifest(recipe, reference):
    rows = step_metrics(reference)
    assert [(r["stage"], r["step"]) for r in rows] == [(0, s) for s in range(1, 7)] + [(1, s) for s in range(1, 6)]
    manifest = json.loads((reference / "run.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done", "done"]
    assert manifest["world_size"] == 2
    r = load_recipe(recipe)
    assert [s["stage_hash"] for s in manifest["stages"]] == [r.stage_hash(0), r.stage_hash(1)]
    assert yaml.safe_load((reference / "recipe.yaml").read_text()) == yaml.safe_load(recipe.read_text())
    ckpts = reference / "checkpoints"
    assert (ckpts / "s01-end").is_dir() and (ckpts / "s02-end").is_dir()
    assert json.loads((ckpts / "latest.json").read_text())["tag"] == "s02-end"
    for name in ("01-general", "02-code"):
        hf = reference / "stages" / name / "hf"
        assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()
        assert (hf / "tokenizer.model").is_file()
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns something


def test_lr_rewarms_at_each_stage_and_follows_the_schedule(recipe, reference):
    r = load_recipe(recipe)
    rows = step_metrics(reference)
    for index, steps in enumerate(STEPS):
        sched = StageSchedule.from_recipe(r.stages[index].schedule, steps)
        logged = [row["lr"] for row in rows if row["stage"] == index]
        assert logged == pytest.approx([sched.lr(s) for s in range(steps)])
    first_of_second = [row["lr"] for row in rows if row["stage"] == 1][0]
    assert first_of_second < 2e-3 and first_of_second > rows[5]["lr"]  # re-warm, from min toward max


def test_export_loads_offline_and_matches_the_trained_weights(recipe, reference):
    from transformers import AutoModelForCausalLM

    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.build import build_model

    r = load_recipe(recipe)
    tok = load_tokenizer(r.tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(reference / "stages" / "02-code" / "hf", local_files_only=True).eval()
    # The trained weights, read independently from DeepSpeed's stage-end checkpoint.
    states = torch.load(reference / "checkpoints" / "s02-end" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    trained = build_model(r, tok.vocab_size, tok.eos_id)
    trained.load_state_dict(states)
    trained.eval()
    untrained = build_model(r, tok.vocab_size, tok.eos_id).eval()
    ids = torch.tensor([tok.encode_batch(["def add(a, b):\n    return a + b\n"])[0]])
    with torch.no_grad():
        got, want, before = (m(input_ids=ids).logits for m in (hf, trained, untrained))
    assert torch.equal(got, want)
    assert not torch.allclose(got, before, atol=1e-3)


def test_a_run_killed_mid_stage_after_a_stage_end_and_mid_replay_with_loader_workers_is_exact(recipe, reference, tmp_path):
    """One run killed three times and resumed after each: at step 3 (last checkpoint: step 2, so
    step 3 is trained twice); right after stage 1 ends (the stage is never run again); at step 3 of
    stage 2, which replays stage 1's source, now with DataLoader workers prefetching ahead of the
    trainer (`train.num_workers` is outside the stage hash): the checkpointed stream state counts
    trained steps, so every resume is exact."""
    raw = yaml.safe_load(recipe.read_text())
    raw["train"] = {"num_workers": 1}
    with_workers = write_recipe(recipe.parent, raw, "workers.yaml")
    run_dir = tmp_path / "run"
    strata(["train", recipe, "--run-dir", run_dir], nproc=2, fault="kill@1:3", expect="killed")
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"] == "s01-step000002"
    # Debris of a save torn by the kill: a half-written temp folder; it must not be picked up.
    torn = run_dir / "checkpoints" / ".tmp-s01-step000004"
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 100)
    proc = strata(["train", recipe, "--run-dir", run_dir], nproc=2, fault=f"kill@1:{STEPS[0]}", expect="killed")
    assert "resuming at step 2 from s01-step000002" in proc.stdout
    assert not torn.exists()
    assert json.loads((run_dir / "run.json").read_text())["stages"][0]["status"] == "done"
    proc = strata(["train", with_workers, "--run-dir", run_dir], nproc=2, fault="kill@2:3", expect="killed")
    assert "stage 1 general |" not in proc.stdout + proc.stderr  # no step of stage 1 ran again
    assert "starting from s01-end" in proc.stdout
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"] == "s02-step000002"
    proc = strata(["train", with_workers, "--run-dir", run_dir], nproc=2)
    assert "resuming at step 2 from s02-step000002" in proc.stdout
    assert step_metrics(run_dir) == step_metrics(reference)  # exact: every loss, lr, grad norm and token count


def test_resume_with_one_process_after_two_keeps_order_and_losses(recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    strata(["train", recipe, "--run-dir", run_dir], nproc=2, fault="kill@1:3", expect="killed")
    proc = strata(["train", recipe, "--run-dir", run_dir])  # ZeRO-1 partitions: converted to a universal checkpoint
    assert "resuming at step 2 from s01-step000002" in proc.stdout
    assert "Universal checkpoint in" in proc.stdout  # (the copy is pruned with its tag later)
    got, want = step_metrics(run_dir), step_metrics(reference)
    assert [(r["stage"], r["step"], r["tokens"]) for r in got] == [(r["stage"], r["step"], r["tokens"]) for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-4)
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 1


def test_finished_run_resumes_to_nothing_and_a_changed_finished_stage_is_refused(recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    proc = strata(["train", recipe, "--run-dir", run_dir])
    assert "nothing to do" in proc.stdout
    assert (run_dir / "metrics.jsonl").read_text() == before

    raw = yaml.safe_load(recipe.read_text())
    raw["stages"][0]["schedule"]["max_lr"] = 1e-2
    changed = recipe.with_name("changed.yaml")
    changed.write_text(yaml.safe_dump(raw))
    proc = strata(["train", changed, "--run-dir", run_dir], expect=1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'general'" in errors[0] and "different recipe section" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_zero_stage_0_trains_the_same_model(recipe, reference, tmp_path):
    """ZeRO 0 (plain data parallel) agrees with ZeRO 1. (ZeRO-3, its partitioned weights gathered
    for the export, against ZeRO-2 with every term on: tests/train/test_objectives.py.)"""
    from transformers import AutoModelForCausalLM

    raw = yaml.safe_load(recipe.read_text())
    raw["deepspeed"] = {"zero_stage": 0}
    other = write_recipe(recipe.parent, raw, name="zero0.yaml")
    run_dir = tmp_path / "run"
    strata(["train", other, "--run-dir", run_dir], nproc=2)
    got, want = step_metrics(run_dir), step_metrics(reference)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-4)
    ids = torch.arange(3, 40).unsqueeze(0)
    logits = []
    for folder in (run_dir, reference):
        model = AutoModelForCausalLM.from_pretrained(folder / "stages" / "02-code" / "hf", local_files_only=True)
        with torch.no_grad():
            logits.append(model.eval()(input_ids=ids).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-3)
