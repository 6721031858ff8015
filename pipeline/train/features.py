"""Feature regularisation: keep the student's hidden states close to the teacher's.

`distill: {..., features: {weight, layers, loss}}` adds to the distillation objective

    w_f * mean_{compared layers l} mean_{tokens t it applies to} d(h_s[l, t], h_t[l, t])

with d = mean over the hidden width of (h_s - h_t)^2 (`mse`) or 1 - cos(h_s, h_t) (`cosine`),
where h[l] is the output of decoder block l (0-based; default every block). The teacher is the
distillation teacher (pipeline/train/reference.py), run once for the KL and the features
together: forward hooks on the compared blocks of both models catch their outputs during the
forwards the distillation already makes, so there is no second copy and no second pass. The
tokens are the KL's (every valid token, or those of replayed rows with `on: replay`).

A stage that reshapes the model since the teacher (LLaMA-Pro expansion, width, experts, a new
tokenizer) is refused at recipe load: its blocks no longer line up with the teacher's. Under
ZeRO-3 the hooks see whole activations (ZeRO-3 partitions parameters, not activations).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from pipeline.model.loss import hf_model
from pipeline.recipe.forgetting import Features


def decoder_layers(model: object) -> torch.nn.ModuleList:
    """The decoder blocks of a (DeepSpeed-wrapped, peft-wrapped) Hugging Face causal LM."""
    inner = hf_model(model) or getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return base.model.layers


def compared_layers(spec: Features, num_layers: int) -> list[int]:
    """The 0-based blocks the term compares (negative indices count from the last)."""
    layers = spec.layers if spec.layers is not None else list(range(num_layers))
    return [i % num_layers for i in layers]


@contextlib.contextmanager
def capture(model: object, layers: list[int]) -> Iterator[list[torch.Tensor]]:
    """Outputs of blocks `layers` of `model` during the forwards inside the block, in `layers` order."""
    blocks = decoder_layers(model)
    caught: dict[int, torch.Tensor] = {}
    hooks = [blocks[i].register_forward_hook(
        lambda m, args, out, i=i: caught.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in layers]
    out: list[torch.Tensor] = []
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
    out.extend(caught[i] for i in layers if i in caught)


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token distance [...] of hidden states [..., H], in float32."""
    s, t = student.float(), teacher.float()
    if loss == "mse":
        return (s - t).pow(2).mean(-1)
    return 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)


def feature_term(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor,
                 loss: str) -> torch.Tensor:
    """mean over layers of the mean distance over the masked tokens (0 when none is masked)."""
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    per_layer = [torch.where(mask, feature_distance(s, t, loss), zero).sum() / mask.sum().clamp(min=1)
                 for s, t in zip(student, teacher)]
    return torch.stack(per_layer).mean()
