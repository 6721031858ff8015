"""Partial training end to end: a full stage, a LoRA stage, an MoE-upcycling stage (one process).

The uninterrupted run is the reference; each test kills the run with SIGKILL inside one of the
partial stages, resumes it, and asserts every logged number equals the reference's. The LoRA
stage has dropout 0.1, so these are also two runs that must draw the same dropout masks. The same
runs check what the stages leave behind: the merged LoRA export is a plain Llama, the adapter
folder reloads with peft on the previous export and gives the merged export's logits, the MoE
export loads with AutoModelForCausalLM and generates, and held-out evaluation runs on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    general_then_code,
    prepared_recipe,
    recipe_dict,
    small_corpus,
    step_metrics,
    strata,
    train_here,
)
from transformers import AutoModelForCausalLM

from pipeline.errors import StrataError
from pipeline.train.run_folder import stage_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("partial")
    stages = general_then_code(tmp, (2, 4), docs=12)
    stages[1]["adapter"] = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj"]}
    stages.append({"name": "moe", "tokens": 8 * 64 * 4, "sources": [{"name": "de", "path": str(small_corpus(tmp, "de", 12))}],
                   "expand": {"method": "moe", "experts": 4, "top_k": 2, "aux_loss_coef": 0.05},
                   "schedule": stages[0]["schedule"]})
    return prepared_recipe(tmp, recipe_dict(tmp, stages, checkpoint={"every": 1, "keep": 1},
                                                data={"dir": str(tmp / "data"), "heldout": 0.2}))


@pytest.fixture(scope="module")
def reference(recipe) -> Path:
    run = recipe.parent / "reference"
    train_here(recipe, run)
    return run


def ids() -> torch.Tensor:
    return torch.arange(3, 35).reshape(1, 32)


def test_adapter_stage_resumes_exactly_and_leaves_a_merged_export_and_a_peft_adapter(recipe, reference, tmp_path):
    from peft import PeftModel

    run = tmp_path / "run"
    strata(["train", recipe, "--run-dir", run], fault="kill@2:2", expect="killed")
    strata(["train", recipe, "--run-dir", run])
    assert step_metrics(run) == step_metrics(reference)

    stages = reference / "stages"
    merged = AutoModelForCausalLM.from_pretrained(stages / "02-code" / "hf", local_files_only=True).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"  # a plain model: no peft needed
    before = AutoModelForCausalLM.from_pretrained(stages / "01-general" / "hf", local_files_only=True)
    start = {k: v.clone() for k, v in before.state_dict().items()}  # peft wraps `before` in place
    adapted = PeftModel.from_pretrained(before, stages / "02-code" / "adapter").eval()
    with torch.no_grad():
        assert (adapted(input_ids=ids()).logits - merged(input_ids=ids()).logits).abs().max() <= 1e-5
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_lora_dropout_stage_killed_before_its_first_checkpoint_resumes_to_the_same_export(recipe, reference, tmp_path):
    """LoRA dropout 0.1 draws masks: the stage starts from RNG states seeded by (seed, stage), so the
    resume from the previous stage's end draws the same masks as the run that never stopped."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    strata(["train", recipe, "--run-dir", run], fault="kill@2:1:mid", expect="killed")
    assert not (run / "stages" / "02-code").exists()
    strata(["train", recipe, "--run-dir", run])
    assert step_metrics(run) == step_metrics(reference)
    ours, theirs = (load_file(r / "stages" / "02-code" / "hf" / "model.safetensors") for r in (run, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # every file the stage wrote has its checksum in run.json, the adapter too, checked when read
    files = json.loads((run / "run.json").read_text())["stages"][1]["files"]
    assert "stages/02-code/hf/model.safetensors" in files
    adapter = [k for k in files if k.startswith("stages/02-code/adapter/") and k.endswith(".safetensors")]
    assert adapter and stage_folder(run, 1, "code", "adapter") == run / "stages" / "02-code" / "adapter"
    weights = run / adapter[0]
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(StrataError, match=f"{weights}: differs from its checksum in run.json"):
        stage_folder(run, 1, "code", "adapter")


def test_moe_stage_resumes_exactly_logs_the_router_and_its_export_generates(recipe, reference, tmp_path):
    run = tmp_path / "run"
    strata(["train", recipe, "--run-dir", run], fault="kill@3:2", expect="killed")
    strata(["train", recipe, "--run-dir", run])
    assert step_metrics(run) == step_metrics(reference)

    rows = [r for r in step_metrics(reference) if r["stage_name"] == "moe"]
    assert all(r["balance_loss"] > 0 and len(r["expert_share"]) == 4 for r in rows)
    assert all(abs(sum(r["expert_share"]) - 1) < 1e-5 for r in rows)
    moe = AutoModelForCausalLM.from_pretrained(reference / "stages" / "03-moe" / "hf", local_files_only=True).eval()
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4
    assert moe.generate(ids()[:, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
    (run / "eval.json").unlink()  # written during training; `strata eval` redoes it from the exports
    strata(["eval", run])
    assert "moe" in json.loads((run / "eval.json").read_text())["loss"]
