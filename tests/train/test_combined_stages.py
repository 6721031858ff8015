"""Combinations of stage features that trained without complaint but computed something else.

In-process on tiny models: an MoE student keeps its router's balance term under distillation and
under RHO-1, a stage-end merge reaches the module of an adapter stage, a merged export is written
in `export.dtype`, and EWC in the first stage takes its Fisher from the `pretraining:` sources.
(slow) One run combines them all end to end.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import general_then_code, prepared_recipe, recipe_dict, small_corpus, step_metrics, strata
from safetensors.torch import load_file
from test_objectives import batch, tiny
from transformers import AutoModelForCausalLM

from pipeline.data.stream import SourceWindows
from pipeline.errors import StrataError
from pipeline.evaluate.heldout import domain_data, evaluate_domain, recipe_domains
from pipeline.model.adapters import add_adapter
from pipeline.model.experts import upcycle
from pipeline.model.loss import causal_lm_loss
from pipeline.model.merge import merge_folders
from pipeline.recipe.forgetting import Distill
from pipeline.recipe.load import load_recipe
from pipeline.recipe.spec import Selection
from pipeline.train.anchor import estimate_fisher, pretraining_batches
from pipeline.train.merging import load_merged
from pipeline.train.objectives import Distillation, Objective
from pipeline.train.selection import Rho1
from pipeline.train.step import Step

LORA = {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}


def moe(coef: float) -> torch.nn.Module:
    return upcycle(tiny(0), experts=2, top_k=1, aux_loss_coef=coef, seed=3)


def test_distillation_keeps_an_moe_students_balance_term():
    student = moe(coef=1.0)
    ce, _ = Distillation(Distill(weight=1.0), tiny(1), own_sources=1).losses(student, batch())
    plain = causal_lm_loss(student, batch())  # CE + coef * balance, as a stage without distill trains
    aux = student(input_ids=batch()["input_ids"], position_ids=batch()["position_ids"]).aux_loss
    assert aux > 0.5  # the term is large enough that leaving it out would show
    torch.testing.assert_close(ce, plain, rtol=1e-5, atol=1e-5)


class Engine:
    """What the training step (pipeline/train/step.py) needs of a DeepSpeed engine (its module, calling it, backward)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        """The optimizer step: none here, the gradients are what the test reads."""


class Stream:
    grad_accum = 2
    plan = SimpleNamespace(mixture=[SimpleNamespace(replay_of=None)])  # one own source, no replay

    def __init__(self):
        self.batches = [{**batch(), "index": torch.arange(4)}, {**batch(), "index": torch.arange(4, 8)}]
        self.batches[1]["input_ids"] = self.batches[1]["input_ids"].flip(0)

    def __next__(self):
        return self.batches.pop(0)


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_rho1_keeps_an_moe_routers_balance_term(scope):
    """The router's gradient with the term on minus with it off is the gradient of the term."""
    grads = {}
    for coef in (0.0, 1.0):
        model = moe(coef)
        rho1 = Rho1(Selection(reference="x", ratio=0.5, scope=scope), ["a"], 1, reference=tiny(1))
        Step(Objective(), rho1)(Engine(model), Stream(), torch.device("cpu"))
        grads[coef] = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    model = moe(1.0)
    for b in Stream().batches:
        model(input_ids=b["input_ids"], position_ids=b["position_ids"]).aux_loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            assert p.grad.abs().sum() > 0
            torch.testing.assert_close(grads[1.0][name] - grads[0.0][name], p.grad, rtol=1e-4, atol=1e-6)


def test_a_stage_end_merge_reaches_the_module_of_an_adapter_stage(tmp_path):
    module = add_adapter(tiny(0), LORA, seed=0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter: it changes the logits
    merge = tiny(2)  # the merged export, under plain Hugging Face names
    load_merged(module, merge.state_dict(), tmp_path)
    with torch.no_grad():
        got = module(input_ids=batch()["input_ids"]).logits
        want = merge(input_ids=batch()["input_ids"]).logits
    torch.testing.assert_close(got, want)  # the evaluation after the stage sees the merge
    with pytest.raises(StrataError, match="weights the trained model lacks"):
        load_merged(tiny(0), {"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}, tmp_path)


def test_a_merged_export_is_written_in_the_export_dtype(tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        tiny(seed).save_pretrained(tmp_path / name)
    merge_folders(tmp_path / "a", tmp_path / "b", "linear", 0.5, tmp_path / "m", "bfloat16")
    weights = load_file(str(next((tmp_path / "m").glob("*.safetensors"))))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_ewc_in_the_first_stage_estimates_its_fisher_on_the_pretraining_sources(tmp_path):
    stages = general_then_code(tmp_path, (2, 2), docs=3)[:1]
    stages[0]["regularize"] = {"method": "ewc", "weight": 1.0, "fisher_tokens": 3 * 2 * 64}
    pretraining = [{"name": "base_en", "path": str(small_corpus(tmp_path, "en", 4)), "weight": 1.0},
                   {"name": "base_de", "path": str(small_corpus(tmp_path, "de", 4)), "weight": 3.0}]
    recipe = load_recipe(prepared_recipe(tmp_path, recipe_dict(tmp_path, stages, pretraining=pretraining)))
    en, de = (SourceWindows(recipe, s["name"], recipe.seq_len) for s in pretraining)
    batches = pretraining_batches(recipe, 0)
    rows = torch.cat([next(batches)["input_ids"] for _ in range(2)])  # 4 rows, weights 1 : 3
    want = [de.window(0), en.window(0), de.window(1), de.window(2)]  # largest deficit first
    assert np.array_equal(rows.numpy(), np.stack(want)[:, :-1])
    model = tiny(0)
    model.resize_token_embeddings(8000)
    fisher = estimate_fisher(model, recipe, 0, torch.device("cpu"))
    assert sorted(fisher) == sorted(n for n, _ in model.named_parameters())
    assert all(torch.isfinite(f).all() for f in fisher.values()) and fisher["lm_head.weight"].sum() > 0


@pytest.mark.slow
def test_pretraining_ewc_then_an_adapter_stage_with_distill_merge_and_bf16_export(tmp_path):
    """One run: EWC in stage 1 from the pretraining sources; stage 2 a LoRA adapter with activation
    checkpointing, distilled from the previous stage and merged with it, exported in bf16."""
    stages = general_then_code(tmp_path, (2, 3), docs=6)
    stages[0]["regularize"] = {"method": "ewc", "weight": 10.0, "fisher_tokens": 2 * 2 * 64}
    stages[1].update(adapter=LORA, distill={"teacher": "previous", "weight": 0.5},
                     merge={"method": "linear", "weight": 0.5, "with": "previous"})
    raw = recipe_dict(tmp_path, stages, pretraining=[{"name": "base", "path": str(small_corpus(tmp_path, "de", 6))}],
                      train={"activation_checkpointing": True}, export={"dtype": "bf16"})
    raw["data"]["heldout"] = 0.2
    run, path = tmp_path / "run", prepared_recipe(tmp_path, raw)
    strata(["train", path, "--run-dir", run])
    assert (run / "stages" / "01-general" / "anchor" / "fisher.safetensors").is_file()
    rows = step_metrics(run)
    assert all(r["penalty"] >= 0 for r in rows if r["stage"] == 0) and all(r["kl"] >= 0 for r in rows if r["stage"] == 1)
    folder = run / "stages" / "02-code"
    assert {t.dtype for t in load_file(str(next((folder / "hf").glob("*.safetensors")))).values()} == {torch.bfloat16}
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=torch.float32)  # noqa: E731
    merged, start, trained = load(folder / "hf"), load(run / "stages" / "01-general" / "hf"), load(folder / "hf-unmerged")
    for name, theta in merged.state_dict().items():
        want = 0.5 * start.state_dict()[name] + 0.5 * trained.state_dict()[name]
        torch.testing.assert_close(theta, want, rtol=0.01, atol=1e-3)
    # the held-out evaluation after the stage saw the merge, not the trained adapter
    recipe = load_recipe(path)
    data = domain_data(recipe, next(d for d in recipe_domains(recipe) if d.name == "py"))
    logged = json.loads((run / "eval.json").read_text())["loss"]["code"]["py"]
    assert evaluate_domain(merged, data, 64, 2)["loss"] == pytest.approx(logged, abs=1e-4)
    assert evaluate_domain(trained, data, 64, 2)["loss"] != pytest.approx(logged, abs=1e-4)
    # and beside it the trained adapter model before the merge (live, fp32; the export is bf16)
    unmerged = json.loads((run / "eval.json").read_text())["loss_unmerged"]["code"]["py"]
    assert unmerged == pytest.approx(evaluate_domain(trained, data, 64, 2)["loss"], abs=1e-2)
