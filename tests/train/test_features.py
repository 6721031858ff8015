"""Feature regularisation: the hidden-state term equals its formula computed by hand (mse and
cosine, on every token or only replayed rows), enters the loss with its weight, trains the
student, and a stage that reshapes the model since its teacher is refused by key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.errors import RecipeError
from pipeline.recipe.forgetting import Distill, Features
from pipeline.recipe.load import load_recipe
from pipeline.train.objectives import Distillation, Objective

VOCAB = 50


def tiny(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 17), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100
    return {"input_ids": ids[:, :-1], "labels": labels, "position_ids": torch.arange(16).repeat(4, 1),
            "source": torch.tensor([0, 1, 0, 2])}


def by_hand(student, teacher, b, layers: list[int], loss: str, keep: torch.Tensor) -> float:
    """hidden_states[l + 1] is block l's output (for blocks before the last)."""
    with torch.no_grad():
        hs = student(input_ids=b["input_ids"], position_ids=b["position_ids"], output_hidden_states=True).hidden_states
        ht = teacher(input_ids=b["input_ids"], position_ids=b["position_ids"], output_hidden_states=True).hidden_states
    per_layer = []
    for layer in layers:
        s, t = hs[layer + 1].double(), ht[layer + 1].double()
        values = []
        for row in range(s.shape[0]):
            for tok in range(s.shape[1]):
                if keep[row, tok]:
                    a, c = s[row, tok], t[row, tok]
                    values.append(((a - c) ** 2).mean() if loss == "mse" else 1 - (a @ c) / (a.norm() * c.norm()))
        per_layer.append(sum(values) / len(values))
    return float(sum(per_layer) / len(per_layer))


@pytest.mark.parametrize(("loss", "on"), [("mse", "all"), ("cosine", "replay")])
def test_feature_term_equals_its_formula_by_hand(loss: str, on: str) -> None:
    student, teacher, b = tiny(1), tiny(2).eval(), batch()
    spec = Distill(weight=0.7, temperature=2.0, on=on, features=Features(weight=3.0, layers=[0, 1], loss=loss))
    total, parts = Objective(distillation=Distillation(spec, teacher, own_sources=1))(student, b)
    valid = b["labels"] != -100
    keep = valid & (b["source"] >= 1).unsqueeze(1) if on == "replay" else valid
    want = by_hand(student, teacher, b, [0, 1], loss, keep)
    assert parts["features"].item() == pytest.approx(want, rel=1e-5)
    assert want > 1e-4  # two different models: the term is not trivially zero
    assert total.item() == pytest.approx(parts["ce"].item() + 0.7 * 4 * parts["kl"].item() + 3.0 * want, rel=1e-5)
    total.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_features_default_to_every_block_and_vanish_against_itself() -> None:
    student, b = tiny(1), batch()
    spec = Distill(features=Features())
    _, parts = Objective(distillation=Distillation(spec, tiny(1).eval(), own_sources=1))(student, b)
    assert parts["features"].item() == pytest.approx(0.0, abs=1e-10)  # the stage's start is its teacher


def test_features_across_an_expansion_are_refused(tmp_path: Path) -> None:
    corpus = tmp_path / "en.txt"
    corpus.write_text("some text\n")
    (tmp_path / "r.yaml").write_text(f"""\
name: t
tokenizer: {TOKENIZER}
model: {{init: {{hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}}}}
seq_len: 32
batch: {{micro: 1, global: 1}}
stages:
  - name: a
    sources: [{{name: en, path: {corpus}}}]
    schedule: {{max_lr: 1.0e-3}}
  - name: b
    sources: [{{name: en2, path: {corpus}}}]
    schedule: {{max_lr: 1.0e-3}}
    expand: {{method: llama_pro, add_layers: 2}}
    distill: {{teacher: a, features: {{weight: 1.0, layers: [0, 5]}}}}
""")
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert "stages[1].distill.features: cannot compare hidden states across stage 'b'" in str(e.value)
    assert "stages[1].distill.features.layers[1]: the model has 2 blocks (0..1), got 5" in str(e.value)
