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

from pipeline.distributed import any_rank, barrier
from pipeline.errors import StrataError
from pipeline.model.merge import merge_folders
from pipeline.recipe.spec import Recipe
from pipeline.train.reference import frozen_model_path


def merge_stage_end(recipe: Recipe, index: int, run_dir: Path, unmerged: Path, out: Path,
                    module: torch.nn.Module, rank: int) -> str:
    """Merge the stage's export `unmerged` into `out` (rank 0) and load it into `module` (every rank)."""
    m = recipe.stages[index].merge
    earlier = frozen_model_path(recipe, index, run_dir, m.with_, "merge.with")
    failed: StrataError | None = None
    if rank == 0:
        try:
            merge_folders(earlier, unmerged, m.method, m.weight, out)
        except StrataError as e:
            failed = e
    if any_rank(failed is not None):
        raise failed or StrataError(f"{out}: the stage-end merge failed on rank 0")
    barrier()
    merged = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        merged.update(load_file(str(f)))
    state = module.state_dict()
    with torch.no_grad():
        for name, tensor in merged.items():
            if name in state:
                state[name].copy_(tensor.to(state[name].dtype))
    return f"merged ({m.method}, weight {m.weight:g} on the trained model) with {earlier}; unmerged export {unmerged}"
