"""A stage's `merge:` at its end: the export and the next stage's start become the merge.

`_finish_stage` exports the trained weights to stages/NN-NAME/hf-unmerged/ (kept, so the unmerged
model can be compared), then rank 0 merges that folder with the earlier model (`with`: previous =
the model the stage started from, or an earlier stage's export) into stages/NN-NAME/hf/, and every
rank loads the merged weights into its module, so the stage-end checkpoint (which the next stage
starts from) and the held-out evaluation after the stage see the merged model.

Refused by `strata check` where it cannot be right: under ZeRO-3 (the module's weights are
partitioned), across a change of shape, and before a stage with `reset_optimizer: false` (its
optimizer's fp32 master weights would still be the unmerged ones).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.data.context import StageContext
from pipeline.distributed import any_rank, barrier
from pipeline.errors import StrataError
from pipeline.model.adapters import is_adapted
from pipeline.model.merge import merge_folders
from pipeline.model.trainable import plain_name
from pipeline.train.reference import frozen_model_path


def merge_stage_end(ctx: StageContext, unmerged: Path, out: Path, module: torch.nn.Module,
                    dtype: torch.dtype = torch.float32) -> str:
    """Merge the stage's export `unmerged` into `out` (rank 0, weights in the export's `dtype`) and
    load it into `module` (every rank)."""
    m, rank = ctx.stage.merge, ctx.rank
    earlier = frozen_model_path(ctx.recipe, ctx.index, ctx.run_dir, m.with_, "merge.with")
    failed: StrataError | None = None
    if rank == 0:
        try:
            merge_folders(earlier, unmerged, m.method, m.weight, out, str(dtype).removeprefix("torch."))
        except StrataError as e:
            failed = e
    if any_rank(failed is not None):
        raise failed or StrataError(f"{out}: the stage-end merge failed on rank 0")
    barrier()
    merged = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        merged.update(load_file(str(f)))
    load_merged(module, merged, out)
    return f"merged ({m.method}, weight {m.weight:g} on the trained model) with {earlier}; unmerged export {unmerged}"


@torch.no_grad()
def load_merged(module: torch.nn.Module, merged: dict[str, torch.Tensor], out: Path) -> None:
    """Put the merged weights (plain Hugging Face names) into the trained module, every one of them.

    A peft module (an adapter stage) holds them under its own names (`base_model.model.` ...
    `.base_layer.`); the adapter's update is inside the merged export, so its layers are switched
    off afterwards, and the module then computes exactly the merge (evaluation after the stage
    sees it; the next stage starts from the export anyway).
    """
    state = {plain_name(n): t for n, t in module.state_dict().items() if "lora_" not in n}
    unknown = sorted(set(merged) - set(state))
    if unknown:
        raise StrataError(f"{out}: the merged model has weights the trained model lacks ({', '.join(unknown[:3])}); "
                          "nothing was loaded")
    for name, tensor in merged.items():
        state[name].copy_(tensor.to(state[name].dtype))
    if is_adapted(module):
        module.base_model.disable_adapter_layers()
