"""Which parameters a stage trains: `trainable:` globs over parameter names, and the optimizer groups.

A stage's `trainable: [patterns]` (shell globs, `*` also crosses dots: `model.layers.*.mlp.*`)
names the parameters that train; everything else is frozen and stays out of the optimizer. Names
are the plain model's (`model.embed_tokens.weight`, `lm_head.weight`), also under a peft adapter
(peft's `base_model.model.` prefix and `.base_layer` are stripped before matching). When the
stage already trains a part of the model (an adapter's weights, LLaMA-Pro's new blocks, new
experts), the patterns add to that part; otherwise they are the whole trainable set. A pattern
that matches no parameter is an error that names it: a typo must not silently freeze the model.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from pipeline.errors import StrataError
from pipeline.model.documents import is_prompt_learning

EMBEDDINGS_AND_HEAD = ["model.embed_tokens.*", "lm_head.*"]  # the first phase after a vocabulary extension


def plain_name(name: str) -> str:
    """A parameter's name in the plain Hugging Face model (peft's wrapping removed)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def plain_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter (tied ones under each name) under its name in the plain Hugging Face model.
    peft wraps a prompt-learning model in `base_model.` only (not `base_model.model.` as LoRA's),
    and keeps its prompt encoder beside it."""
    params = model.named_parameters(remove_duplicate=False)
    if is_prompt_learning(model):
        return [(n.removeprefix("base_model."), p) for n, p in params]
    return [(plain_name(n), p) for n, p in params]


def unmatched(model: nn.Module, patterns: list[str]) -> list[str]:
    names = [n for n, _ in plain_named_parameters(model)]
    return [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]


def apply_trainable(model: nn.Module, patterns: list[str], where: str = "trainable") -> None:
    """Train the parameters matching `patterns` (plus what already trains, if the model is partial)."""
    missing = unmatched(model, patterns)
    if missing:
        raise StrataError(f"{where}: pattern(s) {', '.join(map(repr, missing))} match no parameter of the model "
                          "(names look like model.layers.0.mlp.up_proj.weight)")
    params = plain_named_parameters(model)
    partial = any(not p.requires_grad for _, p in params)
    keep = {id(p) for _, p in params if partial and p.requires_grad}
    for name, p in params:  # tied weights appear under both names: either name unfreezes them
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            keep.add(id(p))
    for _, p in params:
        p.requires_grad_(id(p) in keep)


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights once, a peft adapter's weights included."""
    params = list(model.parameters())  # parameters() de-duplicates tied weights
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(model: nn.Module) -> str:
    trainable, total = trainable_count(model)
    return f"{trainable:,} of {total:,} parameters train ({trainable / max(total, 1):.2%})"


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: no weight decay on norms, biases and on
    tensors whose frozen slices must not move (`strata_no_decay`, set by pipeline/model/experts.py)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not getattr(p, "strata_no_decay", False) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
