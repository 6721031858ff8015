"""Chunked cross-entropy: the same numbers as the plain loss, without the full float32 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.model.loss import causal_lm_loss, chunked, hidden_and_head, token_losses, token_stats

VOCAB, L = 300, 64


def tiny(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, tie_word_embeddings=tied, use_cache=False)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def packed_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, L))
    labels = torch.roll(ids, -1, 1)
    labels[0, :5] = -100  # ignored labels count neither in the sum nor in the mean
    pos = torch.cat([torch.arange(40), torch.arange(L - 40)]).repeat(2, 1)  # two documents per window
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def plain_losses(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), batch["labels"].reshape(-1), reduction="none")


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a, b):
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_mean_loss_and_gradients_equal_the_plain_loss(tied):
    model, batch = tiny(tied), packed_batch()
    valid = batch["labels"] != -100
    expected = plain_losses(model, batch)[valid.reshape(-1)].mean()
    expected.backward()
    want = grads(model)
    got = causal_lm_loss(model, batch, chunk=7)  # 128 tokens: 18 full chunks and one of 2
    got.backward()
    assert abs(got.item() - expected.item()) < 1e-5
    assert_same_grads(grads(model), want)


def test_per_token_losses_and_their_gradients_equal_the_plain_ones():
    """RHO-1 weights per-token losses by a mask: gradients of any weighting must match."""
    model, batch = tiny(), packed_batch()
    weights = torch.rand(2, L)
    plain = plain_losses(model, batch).view(2, L)
    (plain * weights).sum().backward()
    want = grads(model)
    losses = token_losses(model, batch, chunk=11)
    (losses * weights).sum().backward()
    torch.testing.assert_close(losses.detach(), plain.detach(), atol=1e-5, rtol=1e-5)
    assert losses[0, :5].eq(0).all()
    assert_same_grads(grads(model), want)


def test_frozen_head_and_embeddings_get_no_gradient_and_the_rest_the_same():
    model, batch = tiny(), packed_batch()
    model.lm_head.weight.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)
    valid = (batch["labels"] != -100).reshape(-1)
    plain_losses(model, batch)[valid].mean().backward()
    want = grads(model)
    causal_lm_loss(model, batch, chunk=16).backward()
    got = grads(model)
    assert model.lm_head.weight.grad is None and got[0] is None
    assert_same_grads(got, want)


def test_evaluation_stats_equal_loss_and_argmax_of_the_full_logits():
    model, batch = tiny(), packed_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        loss, hit = token_stats(model, batch, chunk=9)
    assert torch.equal(hit.bool(), logits.argmax(-1) == batch["labels"])
    torch.testing.assert_close(loss, plain_losses(model, batch).view(2, L), atol=1e-5, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """The largest logits-like tensor ([..., VOCAB], not the head's weight seen transposed) that any op
    produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == VOCAB and tuple(t.shape) != (64, VOCAB):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_the_size_of_all_logits_ever_exists():
    model, batch = tiny(), packed_batch()
    full = 2 * L * VOCAB
    with LargestTensor() as plain:
        plain_losses(model, batch).mean().backward()
    with LargestTensor() as chunk:
        causal_lm_loss(model, batch, chunk=16).backward()
    assert plain.largest >= full  # the probe sees the logits when they exist
    assert chunk.largest <= 16 * VOCAB < full  # forward and backward alike: one chunk's logits at most


def test_the_per_chunk_api_slices_extra_per_token_inputs_for_other_losses():
    """What a distillation KL needs: the student's logits chunk beside the teacher's rows."""
    model, batch = tiny(), packed_batch()
    teacher = torch.randn(2, L, VOCAB)

    def kl(logits, t):
        return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(t, -1), log_target=True,
                        reduction="none").sum(-1)

    hidden, head = hidden_and_head(model, batch)
    got = chunked(hidden, head, kl, teacher, chunk=13)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    torch.testing.assert_close(got, kl(logits, teacher), atol=1e-5, rtol=1e-5)
