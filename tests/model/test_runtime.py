"""Attention backends, activation checkpointing and torch.compile: same numbers, other memory/speed."""

from __future__ import annotations

import pytest
import torch
from conftest import recipe_dict
from test_loss import VOCAB, assert_same_grads, grads, packed_batch, tiny

from pipeline.errors import RecipeError, StrataError
from pipeline.model.loss import causal_lm_loss
from pipeline.model.runtime import apply_training_options, blocks, resolve_attention
from pipeline.recipe.load import parse_recipe
from pipeline.recipe.spec import Train


def saved_bytes(model, batch) -> int:
    """Bytes autograd keeps for the backward of one loss (what checkpointing is meant to cut)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: set = set()

    def pack(t):
        if t.data_ptr() not in params:  # weights are kept anyway; count activations once each
            seen.add((t.data_ptr(), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    return sum(size for _, size in seen)


@pytest.mark.parametrize("every", [True, 2])
def test_activation_checkpointing_keeps_losses_and_gradients_with_frozen_blocks(every):
    plain, batch = tiny(), packed_batch()
    # LLaMA-Pro-like: embeddings and an old block frozen, so the first block's input needs no
    # gradient (reentrant checkpointing would silently drop its weights' gradients)
    plain.model.embed_tokens.weight.requires_grad_(False)
    for p in plain.model.layers[1].parameters():
        p.requires_grad_(False)
    ckpt = tiny()
    ckpt.load_state_dict(plain.state_dict())
    for name, p in ckpt.named_parameters():
        p.requires_grad_(dict(plain.named_parameters())[name].requires_grad)
    apply_training_options(ckpt, Train(activation_checkpointing=every), "cpu")
    assert [b.gradient_checkpointing for b in blocks(ckpt)] == ([True, True] if every is True else [True, False])
    base_bytes = saved_bytes(plain, batch)
    want = grads(plain)
    ckpt_bytes = saved_bytes(ckpt, batch)
    assert_same_grads(grads(ckpt), want)
    assert want[0] is None and want[-1] is not None
    assert abs(causal_lm_loss(ckpt, batch).item() - causal_lm_loss(plain, batch).item()) < 1e-6
    assert ckpt_bytes < base_bytes * (0.8 if every is True else 0.95)  # it did checkpoint


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention"])
def test_every_cpu_attention_backend_keeps_packed_documents_apart(attention):
    model = tiny()
    apply_training_options(model, Train(attention=attention), "cpu")
    assert model.config._attn_implementation == attention
    first, second = torch.randint(3, VOCAB, (1, 9)), torch.randint(3, VOCAB, (1, 7))
    ids = torch.cat([first, second], dim=1)
    pos = torch.cat([torch.arange(9), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = model(input_ids=second, use_cache=False).logits
        leaky = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(packed[:, 9:], alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(leaky[:, 9:], alone, atol=1e-3)


def test_auto_attention_is_sdpa_on_cpu_and_flash_attention_needs_cuda():
    assert resolve_attention("auto", "cpu") == "sdpa"
    with pytest.raises(StrataError, match="flash_attention_2"):
        resolve_attention("flash_attention_2", "cpu")


@pytest.mark.slow  # inductor compiles the block: about a minute on 2 CPU cores, cached after
def test_compiled_blocks_train_to_the_same_loss_and_gradients():
    eager, batch = tiny(), packed_batch()
    compiled = tiny()
    apply_training_options(compiled, Train(compile=True, activation_checkpointing=True), "cpu")
    for _ in range(2):  # the second call runs the cached graph
        loss = causal_lm_loss(compiled, batch)
        loss.backward()
        got = grads(compiled)
    want_loss = causal_lm_loss(eager, batch)
    want_loss.backward()
    assert abs(loss.item() - want_loss.item()) < 1e-4
    for x, y in zip(got, grads(eager)):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3)
    assert sorted(compiled.state_dict()) == sorted(eager.state_dict())  # checkpoints and exports unchanged


@pytest.mark.parametrize("value", [0, -1, "yes", 1.5])
def test_bad_activation_checkpointing_is_an_error_naming_the_key(tmp_path, value):
    src = tmp_path / "x.txt"
    src.write_text("hello\n")
    raw = recipe_dict(tmp_path, [{"name": "a", "sources": [{"name": "x", "path": str(src)}],
                                  "schedule": {"max_lr": 1e-3}}], train={"activation_checkpointing": value})
    with pytest.raises(RecipeError, match=r"train\.activation_checkpointing: must be true, false or an integer"):
        parse_recipe(raw, "t.yaml", tmp_path)
    raw["train"] = {"activation_checkpointing": 3, "attention": "eager", "compile": True, "peak_tflops": 100}
    train = parse_recipe(raw, "t.yaml", tmp_path).train
    assert (train.activation_checkpointing, train.attention, train.compile, train.peak_tflops) == (3, "eager", True, 100)
