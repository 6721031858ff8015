"""What a downstream evaluation costs: no batch-size probe on CPU, requests scored at the recipe's seq_len."""

from __future__ import annotations

from conftest import DEMO, small_corpus
from own_checkpoint import from_pretrained_recipe

from pipeline.evaluate import harness
from pipeline.model.build import load_pretrained
from pipeline.recipe.load import load_recipe


def test_auto_batch_on_cpu_is_the_micro_batch_at_seq_len_without_a_probe(tmp_path, own_checkpoint, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    en = small_corpus(tmp_path, "en", 3, chars=300)
    stage = (f"  - {{name: general, tokens: 512, sources: [{{name: en, path: {en}}}], schedule: {{max_lr: 1.0e-3}}}}\n")
    task = DEMO / "tasks" / "continuation_code.yaml"
    path = from_pretrained_recipe(tmp_path, own_checkpoint, stage, f"evaluation: {{tasks: [{task}], limit: 3}}\n")
    recipe = load_recipe(path)
    assert recipe.evaluation.batch_size == "auto" and recipe.batch.micro == 2 and recipe.seq_len == 64

    built = {}
    init = HFLM.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.update(batch_size=self.batch_size, max_length=self.max_length)

    def probe(self, *args, **kwargs):
        raise AssertionError("lm-eval probed batch sizes on CPU")

    monkeypatch.setattr(HFLM, "__init__", spy)
    monkeypatch.setattr(HFLM, "_detect_batch_size", probe)
    model = load_pretrained(own_checkpoint)
    tasks = harness.recipe_tasks(recipe)
    scores = harness.run_tasks(model, harness.hf_tokenizer(own_checkpoint, recipe), tasks, recipe)
    assert built == {"batch_size": 2, "max_length": 64}  # the model's own context is 256
    assert scores["demo_continuation_code"]["samples"] == 3 and "acc" in scores["demo_continuation_code"]["metrics"]
