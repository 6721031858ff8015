"""The frozen model beside the trained one: RHO-1's reference and distillation's teacher.

One home for everything about a model that is read but never trained in a stage: where it is
(`frozen_model_path`: an earlier stage's export, the model the stage started from, or a local
Hugging Face folder), how it is loaded and placed (`load_frozen`: gradients off, eval mode, the
training dtype, the tokenizer's vocabulary covered) and how RHO-1's reference is run
(`reference_losses`, under no_grad). A teacher runs through pipeline/model/loss.py's
`hidden_and_head`, its head chunk by chunk beside the student's (pipeline/train/objectives.py).

Placement. Under ZeRO 0-2 the frozen model is replicated on every rank. Under ZeRO-3 it is
wrapped in a DeepSpeed engine without an optimizer, as DeepSpeed-Chat does for its reference
model, so its parameters are partitioned like the trained model's and a model that only fits
partitioned can still be a teacher or a reference; its forward gathers each layer on the fly.

Both pipeline/train/selection.py and pipeline/train/scoring.py import this module at the top (it
imports neither), which is what broke their import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.data.context import StageContext
from pipeline.errors import StrataError
from pipeline.model.build import build_model, load_pretrained
from pipeline.model.loss import token_losses  # per-token CE, chunked over the vocabulary
from pipeline.recipe.spec import Recipe
from pipeline.train.run_folder import stage_folder

IGNORE = -100


def frozen_model_path(recipe: Recipe, index: int, run_dir: Path, name: str, key: str) -> Path | None:
    """Where the frozen model `name` of stage `index` is (`key` names the recipe key in errors).

    `previous` is the model the stage starts from: the previous stage's export, or for the first
    stage the recipe's `model.from_pretrained` (None: the seeded initial model, built in memory).
    """
    names = [s.name for s in recipe.stages[:index]]
    if name == "previous":
        if index == 0:
            return Path(recipe.model.from_pretrained) if recipe.model.from_pretrained else None
        name = names[-1]
    if name in names:
        j = names.index(name)
        path = stage_folder(Path(run_dir), j, name)  # its files checked against run.json
        if not (path / "config.json").is_file():
            raise StrataError(f"{path}: stages[{index}].{key} is stage {name!r}, which has no export yet "
                              "(it must finish first; pass the run folder with --run-dir)")
        return path
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists() and recipe.file:
        path = Path(recipe.file).resolve().parent / name
    if not (path / "config.json").is_file():
        raise StrataError(f"{path}: stages[{index}].{key} is not a Hugging Face model folder")
    return path


def load_frozen(path: Path | None, ctx: StageContext) -> torch.nn.Module:
    """The frozen model at `path` (None: the recipe's seeded initial model): no gradients, eval
    mode, in the stage's compute dtype on its device.

    It must cover the stage's tokenizer's vocabulary. Under ZeRO-3 (`ctx.zero3_config`, the
    trainer's DeepSpeed config) it is partitioned in an optimizer-less DeepSpeed engine.
    """
    return frozen_model(path, ctx.recipe, ctx.tokenizer, ctx.device, ctx.dtype, ctx.zero3_config)


def frozen_model(path: Path | None, recipe: Recipe, tokenizer: Any, device: torch.device, dtype: torch.dtype,
                 zero3_config: dict | None = None) -> torch.nn.Module:
    """`load_frozen` outside a training stage (generative replay runs before the stage's engine)."""
    vocab_size = tokenizer.vocab_size
    model = build_model(recipe, vocab_size, tokenizer.eos_id) if path is None else load_pretrained(path)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise StrataError(f"{path}: the frozen model knows {rows} token ids, the recipe's tokenizer "
                          f"{vocab_size}; a reference or teacher must share the tokenizer")
    model.requires_grad_(False)
    model = model.to(device=device, dtype=dtype).eval()
    if zero3_config is None:
        return model
    import deepspeed

    config = {k: v for k, v in zero3_config.items() if k not in ("gradient_clipping",)}
    config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    engine.eval()
    return engine


@torch.no_grad()
def reference_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference model's per-token losses, rounded through float16 like the stored scores."""
    return token_losses(model, batch).half().float()
