"""The weights a regularised stage is pulled towards (theta*) and, for EWC, their Fisher (F).

Both are taken once, when the stage starts fresh, and written to the stage's folder:

    RUN_DIR/stages/NN-NAME/anchor/theta.safetensors    theta*: the trainable parameters as the stage started
    RUN_DIR/stages/NN-NAME/anchor/fisher.safetensors   ewc: the diagonal empirical Fisher
    RUN_DIR/stages/NN-NAME/anchor/{theta,fisher}-rank-R-of-W.safetensors   the same under ZeRO-3: rank R's part

A resumed stage reads them back instead of recomputing (the weights it resumes with are no longer
the stage's start, and the Fisher would cost a pass over `fisher_tokens`). They are float32 copies,
so a resumed run's penalty equals the uninterrupted run's bit for bit. Each rank reads only the
ranges it holds, from whichever files the stage wrote (whole ones, or another world size's parts),
so a stage resumes on another number of ranks or ZeRO stage.

Which part a rank holds (`Anchor.slices`: [lo, hi) of each flattened parameter):
  ZeRO 0-2  a contiguous 1/W of the concatenation of all trainable parameters (`rank_slices`),
            taken from whole copies that rank 0 writes;
  ZeRO-3    exactly ZeRO-3's partition of each parameter (`partition_range`): theta* is this rank's
            float32 master weights as the stage starts, F the squares of this rank's gradient
            partition. No rank ever holds a whole copy (each writes its own part file), so the
            two copies scale with the ranks like the optimizer state.

The Fisher is the mean over micro-batches of the squared gradient of the next-token loss, on
`fisher_tokens` tokens of the earlier stages' training data (each earlier stage's stream from its
start, taken in turn; in the first stage, the recipe's `pretraining:` sources, mixed by their
weights, each from its first window: the corpus the starting model learned from), the usual empirical-Fisher approximation of EWC for large models (batch
gradients, not per-sample ones). Under ZeRO 0-2 the micro-batches are shared out over the ranks
and the sums all-reduced. Under ZeRO-3 every rank runs every micro-batch (a ZeRO-3 forward needs
all ranks anyway) and squares its own partition of each parameter's gradient as the backward
produces it (a hook, so a whole gradient exists one parameter at a time and no collective runs
inside the backward): the same F, with W times the compute of the shared pass.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save

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

PART = re.compile(r"^(theta|fisher)-rank-(\d+)-of-(\d+)\.safetensors$")


def anchor_dir(run_dir: Path, recipe: Recipe, index: int) -> Path:
    return stage_dir(Path(run_dir), index, recipe.stages[index].name) / "anchor"


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer updates (and the penalty covers), in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def fisher_batches(recipe: Recipe, index: int) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches the Fisher of stage `index` is estimated on (`fisher_tokens` of them, or
    fewer when the earlier data runs out): each earlier stage's stream from its start, in turn;
    before the first stage, what the starting model learned from."""
    from pipeline.data.shards import prepared_tokens
    from pipeline.data.stream import StageStream
    from pipeline.recipe.plan import build_plan

    spec = recipe.stages[index].regularize
    plans = build_plan(recipe, prepared_tokens(recipe))  # once, for all the earlier stages
    streams = [StageStream(recipe, j, plan=plans[j]) for j in range(index)] or [pretraining_batches(recipe, index)]
    wanted = max(1, math.ceil(spec.fisher_tokens / (recipe.batch.micro * recipe.seq_len)))
    for m in range(wanted):
        try:
            yield next(streams[m % len(streams)])
        except StopIteration:
            return


def estimate_fisher(model: torch.nn.Module, recipe: Recipe, index: int, device: torch.device,
                    rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of `model`'s trainable parameters on the earlier stages' data
    (whole parameters: ZeRO 0-2; the micro-batches shared out over the ranks)."""
    named = trainable(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    used = 0
    for m, batch in enumerate(fisher_batches(recipe, index)):
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


def partitioned_fisher(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], device: torch.device,
                       ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The Fisher on `batches` of range [lo, hi) of each flattened trainable parameter (ZeRO-3:
    this rank's partition), float32. Every rank runs every micro-batch; a hook on each parameter squares its
    range of the whole gradient when the backward produces it and hands autograd a zero-stride
    zero instead, so no gradient is kept and ZeRO's own gradient reduction never runs."""
    named = trainable(model)
    fisher = [torch.zeros(hi - lo, dtype=torch.float32, device=device) for lo, hi in ranges]

    def square_into(k: int):
        lo, hi = ranges[k]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            fisher[k].add_(grad.detach().reshape(-1)[lo:hi].float().pow(2))
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand_as(grad)
        return hook

    handles = [p.register_hook(square_into(k)) for k, (_, p) in enumerate(named)]
    used = 0
    try:
        for batch in batches:
            used += 1
            loss = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
            torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return [f / max(used, 1) for f in fisher]


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


def partition_range(param: torch.nn.Parameter, rank: int) -> tuple[int, int]:
    """[lo, hi) of a ZeRO-3 parameter's flattened weights in rank `rank`'s partition: DeepSpeed
    cuts each parameter into world-size parts of `ds_tensor.ds_numel` elements, the last padded."""
    size = param.ds_tensor.ds_numel
    lo = min(rank * size, param.ds_numel)
    return lo, min(lo + size, param.ds_numel)


@dataclass
class Anchor:
    """theta* (and F for EWC) of this rank's slice of the trainable parameters, float32.

    Like ZeRO's optimizer state, each rank holds only its part (`slices`): 1 / world size of
    the two copies per rank instead of all of them. Under ZeRO 0-2 the penalty of a slice is
    counted on the rank that holds it, times the world size, because DeepSpeed averages the
    gradients over the ranks; under ZeRO-3 (`partitioned`) the slices are ZeRO-3's partitions and
    the penalty's gradient goes straight into them (pipeline/train/objectives.py's `PartitionedPenalty`).
    """

    params: list[torch.nn.Parameter]  # every trainable parameter, in a fixed order
    theta: list[torch.Tensor]  # this rank's slice of each, flattened
    fisher: list[torch.Tensor] | None
    slices: list[tuple[int, int]]
    scale: int  # the world size
    partitioned: bool = False  # ZeRO-3: `slices` are the parameters' own partitions

    @property
    def weights(self) -> int:
        """The number of weights the penalty covers (a ZeRO-3 parameter's `numel()` is its partition's)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.params)

    @property
    def bytes(self) -> int:
        """Bytes this rank holds for theta* and F."""
        held = self.theta + (self.fisher or [])
        return sum(t.numel() * t.element_size() for t in held)


def stage_anchor(model: torch.nn.Module, ctx: StageContext) -> Anchor:
    """theta* and F of a regularised stage, this rank's slice: computed and saved when fresh, else read."""
    folder, rank = anchor_dir(ctx.run_dir, ctx.recipe, ctx.index), ctx.rank
    named = trainable(model)
    keys = ["theta", "fisher"] if ctx.stage.regularize.method == "ewc" else ["theta"]
    partitioned = ctx.zero3_config is not None
    if partitioned:
        slices = [partition_range(p, rank) for _, p in named]
    else:
        slices = rank_slices([p.numel() for _, p in named], rank, ctx.world_size)
    if ctx.fresh:
        if ctx.is_main:  # no file of an earlier, interrupted start (another world size's parts) survives
            folder.mkdir(parents=True, exist_ok=True)
            for stale in [*folder.glob("theta*.safetensors"), *folder.glob("fisher*.safetensors")]:
                stale.unlink()
        barrier()
        held = (partitioned_start if partitioned else whole_start)(model, ctx, slices, keys)
        barrier()
    else:
        held = {key: read_slices(folder, key, [n for n, _ in named], slices, ctx.device) for key in keys}
    return Anchor([p for _, p in named], held["theta"], held.get("fisher"), slices, ctx.world_size, partitioned)


def whole_start(model: torch.nn.Module, ctx: StageContext, slices: list[tuple[int, int]],
                keys: list[str]) -> dict[str, list[torch.Tensor]]:
    """ZeRO 0-2: theta* and F whole for a moment (rank 0 writes them), then only the slice is kept."""
    folder, named = anchor_dir(ctx.run_dir, ctx.recipe, ctx.index), trainable(model)
    tensors = {"theta": {n: p.detach().float().cpu().clone() for n, p in named}}
    if "fisher" in keys:
        tensors["fisher"] = {n: f.cpu() for n, f in estimate_fisher(model, ctx.recipe, ctx.index, ctx.device,
                                                                       ctx.rank, ctx.world_size).items()}
    if ctx.is_main:
        for key in keys:
            write_bytes_atomic(folder / f"{key}.safetensors", save(tensors[key]))
    return {key: [tensors[key][n].reshape(-1)[lo:hi].clone().to(ctx.device) for (n, _), (lo, hi) in zip(named, slices)]
            for key in keys}


def partitioned_start(model: torch.nn.Module, ctx: StageContext, slices: list[tuple[int, int]],
                      keys: list[str]) -> dict[str, list[torch.Tensor]]:
    """ZeRO-3: theta* is this rank's float32 master weights (after the stage's load, expansion or
    merge), F its partition of the Fisher; each rank writes its own part file."""
    from deepspeed.utils import safe_get_local_fp32_param

    folder, named = anchor_dir(ctx.run_dir, ctx.recipe, ctx.index), trainable(model)
    held = {"theta": [safe_get_local_fp32_param(p).detach().reshape(-1)[: hi - lo].float().clone()
                      for (_, p), (lo, hi) in zip(named, slices)]}
    if "fisher" in keys:
        held["fisher"] = partitioned_fisher(model, fisher_batches(ctx.recipe, ctx.index), ctx.device, slices)
    starts = {n: lo for (n, _), (lo, _) in zip(named, slices)}
    for key in keys:
        write_part(part_path(folder, key, ctx.rank, ctx.world_size),
                   {n: t for (n, _), t in zip(named, held[key])}, starts)
    return held


def part_path(folder: Path, key: str, rank: int, world_size: int) -> Path:
    return folder / f"{key}-rank-{rank}-of-{world_size}.safetensors"


def write_part(path: Path, tensors: dict[str, torch.Tensor], starts: dict[str, int]) -> None:
    """One rank's part: each tensor is a flattened range of the parameter of its name, from `starts[name]`."""
    part = {n: t.contiguous().cpu() for n, t in tensors.items()}
    write_bytes_atomic(path, save(part, metadata={"starts": json.dumps(starts)}))


def stored_files(folder: Path, key: str) -> list[Path]:
    """The files that hold `key` (theta or fisher): the whole one, or every rank's part."""
    whole = folder / f"{key}.safetensors"
    if whole.is_file():
        return [whole]
    parts = {int(m[2]): (int(m[3]), p) for p in folder.glob(f"{key}-rank-*.safetensors") if (m := PART.match(p.name))}
    world = {w for w, _ in parts.values()}
    if len(world) != 1 or sorted(parts) != list(range(world.pop())):
        raise StrataError(f"{whole}: the regularised stage's anchor is missing or incomplete; it is written when "
                          "the stage starts and a resume needs it (start the stage again in a new --run-dir)")
    return [parts[r][1] for r in sorted(parts)]


def read_slices(folder: Path, key: str, names: list[str], slices: list[tuple[int, int]],
                device: torch.device) -> list[torch.Tensor]:
    """Range [lo, hi) of each flattened tensor `names[k]` of `key`, from whichever files hold it
    (one tensor at a time, so no rank reads a whole copy of all of them at once)."""
    pieces: list[list[torch.Tensor]] = [[] for _ in names]
    for path in stored_files(folder, key):
        with safe_open(str(path), "pt") as f:
            starts = json.loads((f.metadata() or {}).get("starts", "{}"))
            stored = set(f.keys())
            for k, (name, (lo, hi)) in enumerate(zip(names, slices)):
                if name not in stored:
                    continue
                start = starts.get(name, 0)
                size = math.prod(f.get_slice(name).get_shape())
                a, b = max(lo, start), min(hi, start + size)
                if b > a:
                    pieces[k].append(f.get_tensor(name).reshape(-1)[a - start:b - start].clone())
    out = [torch.cat(p) if p else torch.zeros(0, dtype=torch.float32) for p in pieces]
    short = [n for n, t, (lo, hi) in zip(names, out, slices) if t.numel() != hi - lo]
    if short:
        raise StrataError(f"{folder}: the anchor's {key} does not cover {short[0]!r} (written for another model?)")
    return [t.to(device) for t in out]
