"""How the model runs in training: attention kernel, activation checkpointing, torch.compile.

None of these change what the model computes (tests/model/test_runtime.py checks losses and
gradients against the plain model), only its memory and speed:

* `train.attention`: the Hugging Face attention backend. Every one of them keeps packed documents
  apart (pipeline/model/build.py explains why: the mask comes from `position_ids`). `auto` is
  flash_attention_2 on CUDA when the `flash_attn` package is installed, else sdpa.
* `train.activation_checkpointing`: non-reentrant checkpointing of every (true) or every N-th
  (N) transformer block, via Hugging Face's own switch. Non-reentrant, because the reentrant
  kind loses gradients when a block's inputs do not require them (frozen embeddings, LLaMA-Pro's
  frozen old blocks) and does not mix with ZeRO-3's parameter hooks.
* `train.compile`: `torch.compile` on each transformer block (as torchtitan does), in place with
  `Module.compile()`, so parameter names, checkpoints and exports are unchanged.
"""

from __future__ import annotations

import importlib.util

import torch

from pipeline.errors import StrataError
from pipeline.recipe.spec import Train


def resolve_attention(choice: str, device: torch.device | str) -> str:
    """The backend `choice` names, `auto` resolved for `device`; a missing package is a user error."""
    cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        return "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    if choice == "flash_attention_2" and not (cuda and importlib.util.find_spec("flash_attn")):
        raise StrataError("train.attention: flash_attention_2 needs a CUDA device and the flash-attn package "
                          "(pip install flash-attn); use sdpa or auto")
    return choice


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (decoder layers) of a Hugging Face causal LM."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_training_options(model: torch.nn.Module, train: Train, device: torch.device | str) -> list[str]:
    """Set the recipe's attention, checkpointing and compile options on `model`; what was done, in words."""
    notes = []
    attention = resolve_attention(train.attention, device)
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    notes.append(f"attention {attention}")
    every = 1 if train.activation_checkpointing is True else int(train.activation_checkpointing)
    if every:
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)
        on = sum(bool(b.gradient_checkpointing) for b in blocks(model))
        notes.append(f"activation checkpointing on {on} of {len(blocks(model))} blocks")
    if train.compile:
        for block in blocks(model):
            block.compile()
        notes.append("torch.compile per block")
    return notes
