"""Prompt and prefix tuning on packed windows: the forward runs one row per document.

peft's prompt learning (`PromptTuningConfig`, `PrefixTuningConfig`) prepends its learned virtual
tokens, or its learned per-layer keys and values, once per *sequence*: prompt tuning drops
`position_ids`, and prefix tuning hands the model a KV cache, which turns off transformers'
detection of packed documents. On a packed window, its documents would attend to each other and
only the first would follow the prompt. So for these adapters a packed micro-batch [B, L] is
split into its documents, exactly as its position ids define them (a token whose position does
not follow its predecessor's by one starts a document, so does every window's first token: a
fragment at a window's edge is a document), right-padded into rows [D, T] with an attention mask,
and run through the PeftModel's own forward, which gives every row the prompt (or prefix) and
extends the mask over it. The last hidden states of the real tokens are scattered back into the
packed layout [B, L, H], so every term downstream (CE, distillation KL, RHO-1 masks, metrics,
held-out evaluation) is unchanged. Each document then sees the prompt exactly as it would alone
(tests/model/test_adapter_types.py: the loss of a packed batch is the sum over its documents run
one by one through the PeftModel, to fp32 rounding).

Cost: D rows of the longest document's length instead of B rows of L, so the forward does more
work (padding) when a window packs many short documents beside a long one; the padded positions
are masked and never read.
"""

from __future__ import annotations

from typing import Any

import torch

_PAD = 0  # any token id: padded positions are masked out and their outputs dropped


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """A peft model whose active adapter is prompt or prefix tuning (virtual tokens per sequence)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def document_slots(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(document, offset) of every token of a packed batch [B, L], flattened to [B * L]: documents
    numbered in reading order across the batch, offsets from each document's first token."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    starts = starts.reshape(-1)
    document = torch.cumsum(starts.long(), 0) - 1
    index = torch.arange(starts.numel(), device=starts.device)
    first = torch.zeros(int(document[-1]) + 1, dtype=torch.long, device=starts.device)
    first[document[starts]] = index[starts]
    return document, index - first[document]


def per_document_forward(model: Any, inner: torch.nn.Module, batch: dict[str, torch.Tensor],
                         **extra: Any) -> tuple[torch.Tensor, Any]:
    """The last hidden states [B, L, H] of a packed micro-batch for a prompt-learning PeftModel
    `inner` (called as `model`, e.g. through its DeepSpeed engine), each document run as its own
    row; and the model's output (of the rows). `extra` goes to the forward (`logits_to_keep`)."""
    ids = batch["input_ids"]
    document, offset = document_slots(batch["position_ids"])
    rows, width = int(document[-1]) + 1, int(offset.max()) + 1
    row_ids = torch.full((rows, width), _PAD, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=ids.device)
    row_ids[document, offset] = ids.reshape(-1)
    mask[document, offset] = 1
    caught: list[torch.Tensor] = []
    body = inner.get_base_model().base_model  # the transformer under the head (LlamaModel)
    hook = body.register_forward_hook(lambda m, args, out: caught.append(out[0]))
    try:
        out = model(input_ids=row_ids, attention_mask=mask, use_cache=False, **extra)
    finally:
        hook.remove()
    hidden = caught[-1][:, -width:]  # prompt tuning prepends its virtual tokens to every row
    return hidden[document, offset].reshape(*ids.shape, hidden.shape[-1]), out
