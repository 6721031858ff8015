"""A non-LoRA adapter end to end (slow): a bottleneck-adapter stage killed mid-stage resumes to
the numbers of a run that never stopped; its export is the untouched base plus the adapter
folder, which `load_bottleneck` turns back into the model whose held-out loss Strata reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER, small_corpus, step_metrics, strata, train_here

from pipeline.cli import main
from pipeline.evaluate.heldout import domain_data, evaluate_domain, recipe_domains
from pipeline.model.bottleneck import load_bottleneck
from pipeline.model.build import load_pretrained
from pipeline.recipe.load import load_recipe

pytestmark = pytest.mark.slow

RECIPE = """\
name: bottleneck
seed: 3
tokenizer: {tokenizer}
model: {{init: {{hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}}}}
seq_len: 32
batch: {{micro: 2, global: 4}}
data: {{dir: {data}, heldout: 0.2}}
checkpoint: {{every: 1, keep: 1}}
stages:
  - name: english
    tokens: 256
    sources: [{{name: en, path: {en}}}]
    schedule: {{max_lr: 3.0e-3}}
  - name: german
    tokens: 512
    sources: [{{name: de, path: {de}}}]
    adapter: {{type: bottleneck, size: 8, placement: houlsby}}
    schedule: {{max_lr: 3.0e-3}}
"""


def test_bottleneck_stage_resumes_exactly_and_reloads_from_base_plus_adapter(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(tokenizer=TOKENIZER, data=tmp_path / "data", en=small_corpus(tmp_path, "en", 12),
                                    de=small_corpus(tmp_path, "de", 12)))
    assert main(["prepare", str(recipe), "--quiet"]) == 0
    reference, run = tmp_path / "reference", tmp_path / "run"
    train_here(recipe, reference)
    strata(["train", recipe, "--run-dir", run], fault="kill@2:2", expect="killed")
    strata(["train", recipe, "--run-dir", run])
    assert step_metrics(run) == step_metrics(reference)

    stages = reference / "stages"
    base, start = load_pretrained(stages / "02-german" / "hf"), load_pretrained(stages / "01-english" / "hf")
    for name, weight in start.state_dict().items():
        assert torch.equal(base.state_dict()[name], weight), name  # the frozen base left untouched
    adapted = load_bottleneck(stages / "02-german" / "hf", stages / "02-german" / "adapter")
    ids = torch.arange(3, 35).reshape(1, 32)
    with torch.no_grad():
        assert not torch.allclose(adapted(input_ids=ids).logits, base.eval()(input_ids=ids).logits)
    reported = json.loads((reference / "eval.json").read_text())["loss"]["german"]["de"]
    loaded = load_recipe(recipe)
    german = next(d for d in recipe_domains(loaded) if d.name == "de")
    got = evaluate_domain(adapted, domain_data(loaded, german), 32, 2)["loss"]
    assert reported == pytest.approx(got, rel=1e-6)  # the reloaded model is the one Strata evaluated
