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

Cost: rows padded to the longest document among them, instead of B rows of L. To keep many short
documents beside a long one from multiplying the work, documents are sorted longest first and run
in as few forwards as keep each forward's rows x width within ROW_BUDGET times the micro-batch's
tokens (one forward in the common case; the padded positions are masked and never read); under
ZeRO-3 always in one. With several forwards, the returned model output (an MoE model's router
loss) is the first one's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_PAD = 0  # any token id: padded positions are masked out and their outputs dropped
ROW_BUDGET = 2  # one forward's rows x width stays within this many times the micro-batch's tokens


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


def row_groups(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Runs [start, end) of documents sorted longest first, one forward each: a run's rows times
    its longest document stay within `budget` tokens (a run holds at least one document)."""
    groups, start = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or (i - start + 1) * lengths[start] > budget:
            groups.append((start, i))
            start = i
    return groups


def per_document_forward(model: Any, inner: torch.nn.Module, batch: dict[str, torch.Tensor],
                         **extra: Any) -> tuple[torch.Tensor, Any]:
    """The last hidden states [B, L, H] of a packed micro-batch for a prompt-learning PeftModel
    `inner` (called as `model`, e.g. through its DeepSpeed engine), each document run as its own
    row; and the model's output (of the first forward). `extra` goes to the forward (`logits_to_keep`)."""
    ids = batch["input_ids"]
    document, offset = document_slots(batch["position_ids"])
    lengths = torch.bincount(document)
    order = torch.argsort(lengths, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    token_rank = rank[document]
    tokens = torch.argsort(token_rank, stable=True)  # grouped by document, longest first, in reading order
    sorted_lengths = lengths[order].tolist()
    parts, outs, first = [], [], 0
    # Under ZeRO-3 every rank must call the same modules as often as the others (each call gathers
    # the partitioned weights), so there the rows always run in one forward.
    budget = math.inf if hasattr(next(inner.parameters()), "ds_id") else ROW_BUDGET * ids.numel()
    for start, end in row_groups(sorted_lengths, budget):
        count = sum(sorted_lengths[start:end])
        slot = tokens[first:first + count]
        hidden, out = _rows_forward(model, inner, ids.reshape(-1)[slot], (token_rank[slot] - start, offset[slot]),
                                    (end - start, sorted_lengths[start]), extra)
        parts.append(hidden)
        outs.append(out)
        first += count
    back = torch.empty_like(tokens)
    back[tokens] = torch.arange(len(tokens), device=tokens.device)
    hidden = torch.cat(parts)[back]
    return hidden.reshape(*ids.shape, hidden.shape[-1]), outs[0]


def _rows_forward(model: Any, inner: torch.nn.Module, token_ids: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor],
                  shape: tuple[int, int], extra: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """One forward of documents as right-padded rows of `shape`: `token_ids[k]` goes to row
    `where[0][k]`, column `where[1][k]`; the last hidden state of each token, in that order."""
    row_ids = torch.full(shape, _PAD, dtype=token_ids.dtype, device=token_ids.device)
    mask = torch.zeros(shape, dtype=torch.long, device=token_ids.device)
    row_ids[where] = token_ids
    mask[where] = 1
    caught: list[torch.Tensor] = []
    body = inner.get_base_model().base_model  # the transformer under the head (LlamaModel)
    hook = body.register_forward_hook(lambda m, args, out: caught.append(out[0]))
    try:
        out = model(input_ids=row_ids, attention_mask=mask, use_cache=False, **extra)
    finally:
        hook.remove()
    return caught[-1][:, -shape[1]:][where], out  # prompt tuning prepends its virtual tokens to every row
