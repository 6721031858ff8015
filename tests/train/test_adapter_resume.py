"""Non-LoRA adapters end to end (slow): a bottleneck-adapter stage and a prompt-tuning stage, each
killed mid-stage, resume to the numbers of a run that never stopped; their export is the untouched
base plus the adapter folder, which `load_bottleneck` / `PeftModel.from_pretrained` turn back into
the model whose held-out loss Strata reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER, small_corpus, step_metrics, strata, train_here

from pipeline.cli import main
from pipeline.data.tokenizer import load_tokenizer
from pipeline.evaluate.heldout import domain_data, evaluate_domain, recipe_domains
from pipeline.model.bottleneck import load_bottleneck
from pipeline.model.build import build_model, load_pretrained
from pipeline.recipe.load import load_recipe

pytestmark = pytest.mark.slow

RECIPE = """\
name: adapter
seed: 3
tokenizer: {tokenizer}
model: {{init: {{hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}}}}
seq_len: 32
batch: {{micro: 2, global: 4}}
data: {{dir: {data}, heldout: 0.2}}
checkpoint: {{every: 1, keep: 1}}
stages:
"""
ENGLISH = """\
  - name: english
    tokens: 256
    sources: [{{name: en, path: {en}}}]
    schedule: {{max_lr: 3.0e-3}}
"""
GERMAN = """\
  - name: german
    tokens: {tokens}
    sources: [{{name: de, path: {de}}}]
    adapter: {adapter}
    schedule: {{max_lr: {lr}}}
"""


def resumed_run(tmp_path: Path, stages: str, fault: str, **german: str) -> tuple[Path, Path]:
    """(recipe, reference run): the recipe (`german` fills in GERMAN) trained uninterrupted, and
    killed at `fault` then resumed to the very same logged numbers."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((RECIPE + stages).format(tokenizer=TOKENIZER, data=tmp_path / "data", **german,
                                               en=small_corpus(tmp_path, "en", 12), de=small_corpus(tmp_path, "de", 12)))
    assert main(["prepare", str(recipe), "--quiet"]) == 0
    reference, run = tmp_path / "reference", tmp_path / "run"
    train_here(recipe, reference)
    strata(["train", recipe, "--run-dir", run], fault=fault, expect="killed")
    strata(["train", recipe, "--run-dir", run])
    assert step_metrics(run) == step_metrics(reference)
    return recipe, reference


def reported_loss_is_the_models(recipe: Path, reference: Path, model: torch.nn.Module) -> None:
    """The german held-out loss of `model` (reloaded from the export) is the one in eval.json."""
    reported = json.loads((reference / "eval.json").read_text())["loss"]["german"]["de"]
    loaded = load_recipe(recipe)
    german = next(d for d in recipe_domains(loaded) if d.name == "de")
    got = evaluate_domain(model, domain_data(loaded, german), 32, 2)["loss"]
    assert reported == pytest.approx(got, rel=1e-6)


def same_weights(got: torch.nn.Module, want: torch.nn.Module) -> None:
    for name, weight in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], weight), name  # the frozen base left untouched


def test_bottleneck_stage_resumes_exactly_and_reloads_from_base_plus_adapter(tmp_path: Path) -> None:
    recipe, reference = resumed_run(tmp_path, ENGLISH + GERMAN, "kill@2:2", tokens="512", lr="3.0e-3",
                                    adapter="{type: bottleneck, size: 8, placement: houlsby}")
    stages = reference / "stages"
    base = load_pretrained(stages / "02-german" / "hf")
    same_weights(base, load_pretrained(stages / "01-english" / "hf"))
    adapted = load_bottleneck(stages / "02-german" / "hf", stages / "02-german" / "adapter")
    ids = torch.arange(3, 35).reshape(1, 32)
    with torch.no_grad():
        assert not torch.allclose(adapted(input_ids=ids).logits, base.eval()(input_ids=ids).logits)
    reported_loss_is_the_models(recipe, reference, adapted)


def test_prompt_tuning_stage_resumes_exactly_and_reloads_with_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    recipe, reference = resumed_run(tmp_path, GERMAN, "kill@1:1", tokens="256", lr="3.0e-2",
                                    adapter="{type: prompt_tuning, length: 4}")
    stage, tok = reference / "stages" / "01-german", load_tokenizer(TOKENIZER)
    base = load_pretrained(stage / "hf")
    same_weights(base, build_model(load_recipe(recipe), tok.vocab_size, tok.eos_id))  # only the prompt trained
    reported_loss_is_the_models(recipe, reference, PeftModel.from_pretrained(base, str(stage / "adapter")).eval())
    losses = json.loads((reference / "eval.json").read_text())["loss"]
    assert losses["german"]["de"] != losses["init"]["de"]  # the trained prompt is in the evaluated loss
