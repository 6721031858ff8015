"""Memory per rank of the extra model copies a stage holds besides the model it trains.

A distilling stage holds a teacher, an online RHO-1 stage a reference model (both frozen, in the
compute dtype, partitioned over the ranks under ZeRO-3 like the student, whole on every rank
otherwise); an L2/EWC stage holds theta* (and for EWC the Fisher F) in float32, one slice per rank
(pipeline/train/anchor.py's `Anchor`, like ZeRO's optimizer state; under ZeRO-3 the slice is
ZeRO-3's own partition of each parameter). `strata check` and
`strata train --dry-run` print these per rank, with a warning when they and the trained model's
own state (weights, gradients, AdamW's float32 master and moments, partitioned as the ZeRO stage
says) do not fit the device. The counts come from the stage's model built on the meta device (no
memory, no weights); frozen models are counted at the trained model's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.recipe.spec import Recipe


@dataclass(frozen=True)
class Copy:
    """One extra copy a stage holds, and its bytes on each rank."""

    name: str
    bytes_per_rank: int
    why: str


def stage_copies(recipe: Recipe, index: int, world_size: int, counts: tuple[int, int],
                 dtype_bytes: int) -> list[Copy]:
    """The extra copies of stage `index` on `world_size` ranks; `counts` is (trainable, total)
    parameters of the stage's model, `dtype_bytes` the compute dtype's size."""
    stage, (trainable, total) = recipe.stages[index], counts
    zero3 = recipe.zero_stage == 3
    frozen = total * dtype_bytes // (world_size if zero3 else 1)
    where = "partitioned (ZeRO-3)" if zero3 else "whole on every rank"
    copies = []
    if stage.distill is not None:
        copies.append(Copy("teacher", frozen, f"distill, {where}"))
    if stage.selection is not None and stage.selection.scoring == "online":
        copies.append(Copy("reference", frozen, f"RHO-1 online scoring, {where}"))
    if stage.regularize is not None:
        slice_bytes = -(-trainable // world_size) * 4  # float32, one slice per rank
        held = f"float32, 1/{world_size} per rank" + (", ZeRO-3's partition" if zero3 else "")
        copies.append(Copy("anchor", slice_bytes, f"theta*, {held}"))
        if stage.regularize.method == "ewc":
            copies.append(Copy("fisher", slice_bytes, f"F, {held}"))
    return copies


def trained_state_bytes(recipe: Recipe, world_size: int, counts: tuple[int, int], dtype_bytes: int) -> int:
    """The trained model's own bytes per rank: weights and gradients in the compute dtype, AdamW's
    float32 master weights and two moments (16 bytes per trainable weight with bf16, 8 with fp32),
    each divided over the ranks from the ZeRO stage that partitions it (1: optimizer, 2: +grads, 3: +weights)."""
    zero = recipe.zero_stage
    trainable, total = counts
    optimizer = trainable * (8 + (4 if dtype_bytes < 4 else 0))
    per = lambda n, stage: n // world_size if zero >= stage else n  # noqa: E731
    return per(total * dtype_bytes, 3) + per(trainable * dtype_bytes, 2) + per(optimizer, 1)


def memory_report(recipe: Recipe, index: int, world_size: int, dtype: torch.dtype,
                  device_bytes: int | None) -> tuple[list[str], list[str]]:
    """(lines, warnings) for stage `index`: each extra copy's GiB per rank; a warning when the
    copies and the trained state exceed `device_bytes` (None: not checked)."""
    counts = parameter_counts(recipe, index)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    copies = stage_copies(recipe, index, world_size, counts, dtype_bytes)
    if not copies:
        return [], []
    gib = lambda n: f"{n / 2**30:.3f} GiB"  # noqa: E731
    lines = [f"{c.name}: {gib(c.bytes_per_rank)} per rank ({c.why})" for c in copies]
    need = sum(c.bytes_per_rank for c in copies) + trained_state_bytes(recipe, world_size, counts, dtype_bytes)
    warnings = []
    if device_bytes is not None and need > device_bytes:
        warnings.append(f"stages[{index}]: the extra copies ({', '.join(c.name for c in copies)}) and the trained "
                        f"model's state need about {gib(need)} per rank on {world_size} rank(s), more than the "
                        f"device's {gib(device_bytes)} (before activations)")
    return lines, warnings


def parameter_counts(recipe: Recipe, index: int) -> tuple[int, int]:
    """(trainable, total) parameters of stage `index`'s model, built on the meta device."""
    from pipeline.data.tokenizer import cached_tokenizer
    from pipeline.model.expand import build_stage_model

    tok = cached_tokenizer(recipe.tokenizer_at(index))
    with torch.device("meta"):
        model, _ = build_stage_model(recipe, index, tok.vocab_size, tok.eos_id)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def device_bytes() -> int | None:
    """Memory of this machine's first GPU, or None on a CPU-only machine (nothing to warn about)."""
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def memory_lines(recipe: Recipe, world_size: int) -> tuple[list[str], list[str]]:
    """A line per stage with extra copies per rank (for `strata check`; stages without any have
    none), and the warnings."""
    from pipeline.distributed import compute_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, limit, out, warnings = compute_dtype(recipe.train.dtype, device), device_bytes(), [], []
    for index, stage in enumerate(recipe.stages):
        lines, more = memory_report(recipe, index, world_size, dtype, limit)
        if lines:
            out.append(f"stage {index + 1} {stage.name!r}, extra copies on {world_size} rank(s): " + "; ".join(lines))
        warnings += more
    return out, warnings
