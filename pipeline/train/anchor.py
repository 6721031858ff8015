"""The weights a regularised stage is pulled towards (theta*) and, for EWC, their Fisher (F).

Both are taken once, when the stage starts fresh, and written to the stage's folder:

    RUN_DIR/stages/NN-NAME/anchor/theta.safetensors    theta*: the trainable parameters as the stage started
    RUN_DIR/stages/NN-NAME/anchor/fisher.safetensors   ewc: the diagonal empirical Fisher

A resumed stage reads them back instead of recomputing (the weights it resumes with are no longer
the stage's start, and the Fisher would cost a pass over `fisher_tokens`). They are float32 copies,
so a resumed run's penalty equals the uninterrupted run's bit for bit.

The Fisher is the mean over micro-batches of the squared gradient of the next-token loss, on
`fisher_tokens` tokens of the earlier stages' training data (each earlier stage's stream from its
start, taken in turn; in the first stage, the recipe's `pretraining:` sources, mixed by their
weights, each from its first window: the corpus the starting model learned from), the usual empirical-Fisher approximation of EWC for large models (batch
gradients, not per-sample ones). Under torchrun the micro-batches are shared out over the ranks and
the sums all-reduced, so every rank holds the same F.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save

from pipeline.data.context import StageContext
from pipeline.data.mixer import Mixer
from pipeline.data.packer import pack
from pipeline.data.stream import SourceWindows
from pipeline.distributed import barrier
from pipeline.errors import StrataError
from pipeline.files import write_bytes_atomic
from pipeline.model.loss import causal_lm_loss
from pipeline.recipe.spec import Recipe
from pipeline.train.run_folder import stage_dir


def anchor_dir(run_dir: Path, recipe: Recipe, index: int) -> Path:
    return stage_dir(Path(run_dir), index, recipe.stages[index].name) / "anchor"


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer updates (and the penalty covers), in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def estimate_fisher(model: torch.nn.Module, recipe: Recipe, index: int, device: torch.device,
                    rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of `model`'s trainable parameters on the earlier stages' data."""
    from pipeline.data.shards import prepared_tokens
    from pipeline.data.stream import StageStream
    from pipeline.recipe.plan import build_plan

    spec = recipe.stages[index].regularize
    named = trainable(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    plans = build_plan(recipe, prepared_tokens(recipe))  # once, for all the earlier stages
    # each earlier stage from its start; before the first stage, what the starting model learned
    streams = [StageStream(recipe, j, plan=plans[j]) for j in range(index)] or [pretraining_batches(recipe, index)]
    wanted = max(1, math.ceil(spec.fisher_tokens / (recipe.batch.micro * recipe.seq_len)))
    used = 0
    for m in range(wanted):
        try:
            batch = next(streams[m % len(streams)])
        except StopIteration:
            break
        used += 1
        if m % world_size != rank:
            continue
        loss = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                fisher[n] += g.float().pow(2)
    names = sorted(fisher)
    if world_size > 1:
        for n in names:
            dist.all_reduce(fisher[n])
    return {n: fisher[n] / max(used, 1) for n in names}


def pretraining_batches(recipe: Recipe, index: int) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of the `pretraining:` sources in stage `index`'s tokens, mixed by their weights
    (the stream's exact-share rule), each source read from its first window on."""
    if not recipe.pretraining:
        raise StrataError(f"stages[{index}].regularize: ewc in the first stage needs `pretraining:` sources")
    sources = [SourceWindows(recipe, s.name, recipe.seq_len, tokenizer=recipe.tokenizer_at(index))
               for s in recipe.pretraining]
    mixer, counts, n = Mixer([s.weight for s in recipe.pretraining]), [0] * len(sources), 0
    while True:
        rows = mixer.assign(counts, n, recipe.batch.micro)
        n += len(rows)
        inputs, labels, positions = pack(np.stack([sources[s].window(k) for s, k in rows]), sources[0].eos_id)
        yield {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
               "position_ids": torch.from_numpy(positions)}


def rank_slices(sizes: list[int], rank: int, world_size: int) -> list[tuple[int, int]]:
    """This rank's [lo, hi) of each flattened tensor when the concatenation of all of them is cut
    into `world_size` contiguous, nearly equal parts (rank r holds part r; empty slices are (0, 0))."""
    total = sum(sizes)
    first, last = total * rank // world_size, total * (rank + 1) // world_size
    out, start = [], 0
    for n in sizes:
        lo, hi = min(max(first - start, 0), n), min(max(last - start, 0), n)
        out.append((lo, hi) if hi > lo else (0, 0))
        start += n
    return out


@dataclass
class Anchor:
    """theta* (and F for EWC) of this rank's slice of the trainable parameters, float32.

    Like ZeRO's optimizer state, each rank holds only its part (`rank_slices`): 1 / world size of
    the two copies per rank instead of all of them. The penalty of a slice is counted on the rank
    that holds it, times the world size, because DeepSpeed averages the gradients over the ranks.
    """

    params: list[torch.nn.Parameter]  # every trainable parameter, in a fixed order
    theta: list[torch.Tensor]  # this rank's slice of each, flattened
    fisher: list[torch.Tensor] | None
    slices: list[tuple[int, int]]
    scale: int  # the world size

    @property
    def bytes(self) -> int:
        """Bytes this rank holds for theta* and F."""
        held = self.theta + (self.fisher or [])
        return sum(t.numel() * t.element_size() for t in held)


def stage_anchor(model: torch.nn.Module, ctx: StageContext) -> Anchor:
    """theta* and F of a regularised stage, this rank's slice: computed and saved when fresh, else read."""
    recipe, index, run_dir, fresh = ctx.recipe, ctx.index, ctx.run_dir, ctx.fresh
    device, rank, world_size = ctx.device, ctx.rank, ctx.world_size
    spec = ctx.stage.regularize
    folder = anchor_dir(run_dir, recipe, index)
    named = trainable(model)
    files = {"theta": folder / "theta.safetensors"}
    if spec.method == "ewc":
        files["fisher"] = folder / "fisher.safetensors"
    if fresh:  # whole for a moment (rank 0 writes them), then only the slice is kept
        tensors = {"theta": {n: p.detach().float().cpu().clone() for n, p in named}}
        if spec.method == "ewc":
            tensors["fisher"] = {n: f.cpu() for n, f in estimate_fisher(model, recipe, index, device, rank,
                                                                           world_size).items()}
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            for key, path in files.items():
                write_bytes_atomic(path, save(tensors[key]))
        barrier()
    else:
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise StrataError(f"{missing[0]}: the regularised stage's anchor is missing; it is written when the "
                              "stage starts and a resume needs it (start the stage again in a new --run-dir)")
        tensors = {key: load_file(str(path)) for key, path in files.items()}
    slices = rank_slices([p.numel() for _, p in named], rank, world_size)

    def mine(key: str) -> list[torch.Tensor]:
        return [tensors[key][n].reshape(-1)[lo:hi].clone().to(device) for (n, _), (lo, hi) in zip(named, slices)]

    fisher = mine("fisher") if "fisher" in tensors else None
    return Anchor([p for _, p in named], mine("theta"), fisher, slices, world_size)
