"""Losses over the vocabulary that never hold the full float32 logits.

A 128k-entry vocabulary makes the output layer the largest activation of a small or medium model:
`[tokens x vocab]` float32 logits are 2 GiB per 4,096-token sequence, and autograd keeps another
copy for the softmax's backward. Here the model runs up to its last hidden state only, and the
head (lm_head) and the loss are computed one chunk of tokens at a time. Two ways:

* the mean training loss (`causal_lm_loss`) uses `LinearCrossEntropy`, which takes both gradients
  in the forward chunk by chunk (the gradient of a logit is softmax minus one-hot, known as soon as
  the logits are), so no logits outlive their chunk and nothing is recomputed;
* per-token results (RHO-1's losses, evaluation, any other loss of the logits) go through
  `chunked`: each chunk is wrapped in non-reentrant activation checkpointing, so the forward
  keeps only the chunk's hidden states and its per-token result, and the backward recomputes the
  chunk's logits. So does the mean loss when the head's weight is a ZeRO-3 partition: calling the
  head as a module lets ZeRO-3's hooks gather it (once per chunk call).

Peak memory for the head is about one chunk's logits (CHUNK_BYTES) instead of all of them.
Results equal the plain `F.cross_entropy` over full logits within float32 rounding (the sums are
just taken chunk by chunk); tests/model/test_loss.py checks losses and gradients to 1e-5, with
frozen and tied heads.

On CUDA with `liger-kernel` installed (the `fast` extra) the mean loss uses Liger's fused linear
cross-entropy instead (Triton kernels doing what `LinearCrossEntropy` does).

Reading order: `hidden_and_head` (the model without its head), `chunked` (the per-chunk engine,
also the API for any other loss of the logits, e.g. a distillation KL: pass the teacher's hidden
states or logits as an extra per-token argument and they are sliced alongside), then the losses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.model.documents import is_prompt_learning, per_document_forward
from pipeline.model.experts import balance_loss

IGNORE = -100
CHUNK_BYTES = 128 << 20  # float32 logits of one chunk: 256 tokens of a 128k vocabulary
_NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep=[]: the model skips its head


def hf_model(model: object) -> torch.nn.Module | None:
    """The Hugging Face model inside a DeepSpeed engine (`.module`) or torch.compile wrapper, if any."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return inner if hasattr(inner, "get_output_embeddings") and hasattr(inner, "base_model") else None


def _skips_head(inner: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def hidden_and_head(model: object, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The last hidden states [B, L, H] of a packed micro-batch, and the head that turns them into logits.

    The model is called as a whole (through the DeepSpeed engine when given one, so its forward
    bookkeeping runs) with `logits_to_keep=[]`; a forward hook on the base model catches its
    output. Models that cannot skip their head (custom code) give their logits, and the "head" is
    then the identity: chunking still avoids a float32 copy of all of them. A prompt- or prefix-tuned
    peft model runs each document of the window as its own row (pipeline/model/documents.py).
    """
    hidden, head, _ = _forward(model, batch)
    return hidden, head


def _forward(model: object, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Callable, Any]:
    """`hidden_and_head`, plus the model's own output (an MoE model's router loss is in it)."""
    inner = hf_model(model)
    if inner is not None and is_prompt_learning(inner):  # prompt / prefix tuning: one row per document
        skip = {"logits_to_keep": _NO_LOGITS.to(batch["input_ids"].device)} if _skips_head(inner.get_base_model()) else {}
        hidden, out = per_document_forward(model, inner, batch, **skip)
        return hidden, inner.get_output_embeddings(), out
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                  use_cache=False)
    if inner is None or not _skips_head(inner):
        out = model(**kwargs)
        return out.logits, (lambda x: x), out
    caught: list[torch.Tensor] = []
    hook = inner.base_model.register_forward_hook(lambda m, args, out: caught.append(out[0]))
    try:
        out = model(**kwargs, logits_to_keep=_NO_LOGITS.to(batch["input_ids"].device))
    finally:
        hook.remove()
    return caught[-1], inner.get_output_embeddings(), out


def chunk_tokens(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab))


def chunked(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
            fn: Callable[..., torch.Tensor], *per_token: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """`fn(head(hidden[i:j]), *(t[i:j] for t in per_token))` over chunks of tokens, concatenated.

    `hidden` is [..., H] (flattened to [N, H]); every `per_token` tensor has the same leading
    shape (flattened to [N, ...]); `fn` returns one row per token ([n] or [n, k]). The result has
    the leading shape of `hidden`. With autograd on and more than one chunk, each chunk is
    checkpointed (its logits are recomputed in the backward), so no more than one chunk's logits
    are ever alive; when all tokens fit in one chunk, that bound holds without the recompute,
    which would cost one more head matmul for nothing.
    """
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    rows = [t.reshape(flat.shape[0], *t.shape[len(lead):]) for t in per_token]
    if chunk is None:
        out_features = getattr(head, "out_features", None) or getattr(head, "num_embeddings", None)
        chunk = chunk_tokens(out_features or flat.shape[-1])

    def one(h: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return fn(head(h), *args)

    grad = torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in _params(head)))
    recompute = grad and flat.shape[0] > chunk
    outs = []
    for i in range(0, flat.shape[0], chunk):
        args = (flat[i:i + chunk], *(t[i:i + chunk] for t in rows))
        # determinism_check off: ZeRO-3 releases the head's weight right after the recompute (its
        # post-forward hook), so the saved weight's shape differs from the forward's; its
        # pre-backward hook gathers it again before the gradient needs it.
        outs.append(checkpoint(one, *args, use_reentrant=False, determinism_check="none") if recompute else one(*args))
    out = torch.cat(outs) if outs else flat.new_zeros(0)
    return out.reshape(*lead, *out.shape[1:])


def _params(head: Callable) -> list[torch.nn.Parameter]:
    return list(head.parameters()) if isinstance(head, torch.nn.Module) else []


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token loss of logits [n, V] in float32 (0 where the label is ignored)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")


def token_losses(model: object, batch: dict[str, torch.Tensor], chunk: int | None = None) -> torch.Tensor:
    """Per-token next-token loss [B, L] in float32 (0 where the label is ignored); keeps the graph."""
    hidden, head = hidden_and_head(model, batch)
    return chunked(hidden, head, token_ce, batch["labels"], chunk=chunk)


def causal_lm_loss(model: object, batch: dict[str, torch.Tensor], chunk: int | None = None) -> torch.Tensor:
    """Mean next-token loss over a packed micro-batch; labels are already shifted by the stream.

    We compute the loss here instead of passing `labels=` because Hugging Face shifts labels
    itself, and the stream has done that already (its labels cross window edges correctly).
    An MoE model's router load-balancing term (pipeline/model/experts.py) is added to it.
    """
    hidden, head, balance = hidden_head_and_balance(model, batch)
    loss = _mean_ce(hidden, head, batch["labels"], chunk)
    return loss if balance is None else loss + balance


def hidden_head_and_balance(model: object, batch: dict[str, torch.Tensor]
                            ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], torch.Tensor | None]:
    """`hidden_and_head` of a training forward, and the MoE router's balance term to add to its
    loss (None for a dense model). Every training loss takes it from here, so none leaves it out;
    `balance_loss` also records the router's statistics for the step's metrics."""
    hidden, head, out = _forward(model, batch)
    return hidden, head, balance_loss(model, out)


def train_token_losses(model: object, batch: dict[str, torch.Tensor], chunk: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_losses` of a training forward (RHO-1's), and the MoE balance term (None if dense)."""
    hidden, head, balance = hidden_head_and_balance(model, batch)
    return chunked(hidden, head, token_ce, batch["labels"], chunk=chunk), balance


def _mean_ce(hidden: torch.Tensor, head: Callable, labels: torch.Tensor, chunk: int | None) -> torch.Tensor:
    fused = _liger_loss(hidden, head, labels)
    if fused is not None:
        return fused
    count = (labels != IGNORE).sum()
    if _whole_linear(head) and torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        flat = hidden.reshape(-1, hidden.shape[-1])
        total = LinearCrossEntropy.apply(flat, head.weight, labels.reshape(-1), chunk or chunk_tokens(head.out_features))
        return total / count
    return chunked(hidden, head, token_ce, labels, chunk=chunk).sum() / count


def _whole_linear(head: object) -> bool:
    """A bias-free Linear whose weight is all here (not a ZeRO-3 partition, which only its hooks gather)."""
    return isinstance(head, torch.nn.Linear) and head.bias is None and not hasattr(head.weight, "ds_id")


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T`, with both gradients computed in the forward,
    one chunk of tokens at a time (the approach of Liger's fused linear cross-entropy, in torch).

    For a scalar loss the gradient of every logit is known in the forward (softmax minus the
    one-hot label), so each chunk's logits live only while their contribution to the gradients of
    the hidden states and of the weight is taken; the backward just scales those by the incoming
    gradient. Three matmuls per chunk, as many as the plain loss, and no recomputation. Each
    chunk's share of the weight's gradient is summed into a float32 buffer.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for i in range(0, hidden.shape[0], chunk):
            h, y = hidden[i:i + chunk], labels[i:i + chunk]
            logits = (h @ weight.t()).float()
            valid = y != IGNORE
            target = y.clamp_min(0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
            if need_h or need_w:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(y), device=y.device), target] -= 1.0
                grad = (grad * valid[:, None]).to(weight.dtype)
                if need_h:
                    grad_h[i:i + chunk] = grad @ weight
                if need_w and weight.dtype == torch.float32:
                    grad_w.addmm_(grad.t(), h)
                elif need_w:  # the matmul in the weight's dtype (bf16 tensor cores), the sum in float32
                    grad_w += grad.t() @ h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def token_stats(model: object, batch: dict[str, torch.Tensor], chunk: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and next-token hit (argmax == label) [B, L], float32, for evaluation."""

    def stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.stack([token_ce(logits, labels), (logits.argmax(-1) == labels).float()], dim=-1)

    hidden, head = hidden_and_head(model, batch)
    out = chunked(hidden, head, stats, batch["labels"], chunk=chunk)
    return out[..., 0], out[..., 1]


def _liger_loss(hidden: torch.Tensor, head: Callable, labels: torch.Tensor) -> torch.Tensor | None:
    """Liger's fused linear cross-entropy (mean), on CUDA when installed and the head is a plain
    Linear whose weight is whole (not a ZeRO-3 partition); else None."""
    if not hidden.is_cuda or not isinstance(head, torch.nn.Linear) or hasattr(head.weight, "ds_id"):
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")
    out = loss(head.weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), head.bias)
    return out[0] if isinstance(out, tuple) else out
