"""Held-out evaluation goes through the chunked loss and still gives the full-logits numbers."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.evaluate.heldout import DomainData, _batch, evaluate_domain

VOCAB = 300


def test_domain_loss_and_accuracy_equal_those_of_the_full_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, use_cache=False)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, VOCAB, 300)
    tokens[[40, 170]] = 2  # documents end with EOS, so windows pack several
    data = DomainData(tokens=tokens, eos_id=2, fingerprint="x")
    got = evaluate_domain(model, data, seq_len=64, micro=2)
    loss_sum = hits = count = 0.0
    with torch.no_grad():
        for first in range(0, 5, 2):  # ceil(299 / 64) = 5 windows
            batch = _batch(data, 64, first, min(2, 5 - first))
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            valid = batch["labels"] != -100
            loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
            loss_sum += loss[valid].double().sum().item()
            hits += ((logits.argmax(-1) == batch["labels"]) & valid).sum().item()
            count += valid.sum().item()
    assert got["tokens"] == count == 299
    assert math.isclose(got["loss"], loss_sum / count, rel_tol=1e-6)
    assert got["accuracy"] == hits / count


def test_the_padding_after_the_stream_is_one_document():
    """The last window's EOS padding (never scored) is one document, not one per token: a
    prompt-tuned model runs each document as a row of its own."""
    data = DomainData(tokens=np.arange(3, 103), eos_id=2, fingerprint="x")
    batch = _batch(data, 64, 1, 1)  # window 1: stream tokens 64..99, then 28 EOS
    assert batch["position_ids"][0].tolist() == list(range(36)) + list(range(28))
    assert (batch["labels"][0, 35:] == -100).all() and (batch["labels"][0, :35] != -100).all()
