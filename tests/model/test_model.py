"""The model: seeded init, and packed windows whose documents do not attend to each other."""

from __future__ import annotations

import torch
from conftest import recipe_dict

from pipeline.model.build import build_model, load_pretrained
from pipeline.model.loss import causal_lm_loss
from pipeline.recipe.load import parse_recipe


def tiny_recipe(tmp_path, seed: int = 7):
    src = tmp_path / "x.txt"
    src.write_text("hello\n")
    raw = recipe_dict(tmp_path, [{"name": "a", "sources": [{"name": "x", "path": str(src)}], "schedule": {"max_lr": 1e-3}}],
                      seed=seed)
    return parse_recipe(raw, "t.yaml", tmp_path)


def test_init_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    recipe = tiny_recipe(tmp_path)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = build_model(recipe, vocab_size=300, eos_id=2)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model(recipe, vocab_size=300, eos_id=2)
    c = build_model(tiny_recipe(tmp_path, seed=8), vocab_size=300, eos_id=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64 and a.config.vocab_size == 300


def test_packed_documents_do_not_attend_across_the_boundary(tmp_path):
    model = build_model(tiny_recipe(tmp_path), vocab_size=300, eos_id=2).eval()
    first, second = torch.randint(3, 300, (1, 9)), torch.randint(3, 300, (1, 7))
    ids = torch.cat([first, second], dim=1)
    pos = torch.cat([torch.arange(9), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = model(input_ids=second, use_cache=False).logits
        leaky = model(input_ids=ids, use_cache=False).logits  # no position ids: plain causal mask
    assert torch.allclose(packed[:, 9:], alone, atol=1e-5)
    assert not torch.allclose(leaky[:, 9:], alone, atol=1e-3)  # the check above can fail


def test_loss_uses_the_streams_shifted_labels(tmp_path):
    model = build_model(tiny_recipe(tmp_path), vocab_size=300, eos_id=2)
    ids = torch.randint(3, 300, (2, 8))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "position_ids": torch.arange(8).repeat(2, 1)}
    loss = causal_lm_loss(model, batch)
    logits = model(input_ids=ids, use_cache=False).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), batch["labels"].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_from_pretrained_loads_locally_and_grows_the_vocabulary(tmp_path):
    model = build_model(tiny_recipe(tmp_path), vocab_size=300, eos_id=2)
    model.save_pretrained(tmp_path / "hf")
    again = load_pretrained(tmp_path / "hf", vocab_size=300)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    grown = load_pretrained(tmp_path / "hf", vocab_size=320)
    assert grown.get_input_embeddings().weight.shape[0] == 320
