"""Model options that combine: activation checkpointing on a peft adapter over a frozen model.

With the embeddings frozen no block input requires a gradient; the reentrant checkpointing kind
(and peft's usual `enable_input_require_grads` workaround for it) would then lose the adapter's
gradients. Strata's non-reentrant checkpointing needs no workaround: the gradients are the same,
for LoRA and for prompt tuning (whose forward runs each document as a row behind the virtual
tokens; prefix tuning is refused with checkpointing, pipeline/recipe/adapter_keys.py says why).
"""

from __future__ import annotations

import pytest
import torch
from test_partial import real_ids, tiny_llama  # noqa: F401  (real_ids is a fixture)

from pipeline.model.adapters import add_adapter
from pipeline.model.loss import causal_lm_loss
from pipeline.model.runtime import apply_training_options
from pipeline.recipe.spec import Train

ADAPTERS = {"lora": ({"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}, 8),  # lora_A and lora_B of q, v in 2 blocks
            "prompt_tuning": ({"type": "prompt_tuning", "length": 4}, 1)}  # the virtual tokens' embeddings


def adapter_gradients(ids: torch.Tensor, checkpointing: bool, kind: str) -> dict[str, torch.Tensor]:
    model = add_adapter(tiny_llama(), ADAPTERS[kind][0], seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter: lora_A gets a gradient too
    apply_training_options(model, Train(activation_checkpointing=checkpointing, attention="sdpa"), "cpu")
    model.train()
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "position_ids": torch.arange(ids.shape[1]).repeat(len(ids), 1)}
    causal_lm_loss(model, batch).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_activation_checkpointing_keeps_an_adapters_gradients(kind, real_ids):  # noqa: F811
    plain, checkpointed = adapter_gradients(real_ids, False, kind), adapter_gradients(real_ids, True, kind)
    assert len(plain) == ADAPTERS[kind][1] and sorted(plain) == sorted(checkpointed)
    for name, grad in plain.items():
        assert checkpointed[name] is not None and checkpointed[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)
