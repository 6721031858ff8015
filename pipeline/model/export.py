"""Hugging Face export of the model at the end of a stage: stages/NN-NAME/hf/.

The folder holds model.safetensors, config.json, generation_config.json and the tokenizer files,
so `AutoModelForCausalLM.from_pretrained(path, local_files_only=True)` loads it offline. Under
ZeRO-3 the parameters are partitioned across ranks, so every rank enters a GatheredParameters
context (a collective) and rank 0 writes. The folder is written under a temporary name and
renamed, like every other write of Strata.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pipeline.distributed import any_rank, barrier
from pipeline.errors import StrataError
from pipeline.files import replace_dir, temp_dir_for


def export_hf(engine: Any, tokenizer: Any, out: Path, rank: int,
              adapter: tuple[Path, Path | None] | None = None) -> None:
    """Write the engine's model as a Hugging Face folder at `out` (all ranks must call this).

    `adapter` = (folder, base export) for a peft model: `out` gets the merged plain model and the
    folder the unmerged adapter (pipeline/model/adapters.py)."""
    module = engine.module
    gather: contextlib.AbstractContextManager = contextlib.nullcontext()
    if engine.zero_optimization_partition_weights():
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    failed: OSError | None = None
    with gather:
        if rank == 0:
            try:
                tmp = temp_dir_for(Path(out))
                if adapter is not None:
                    from pipeline.model.adapters import save_adapter, save_merged

                    save_merged(module, tmp)
                    save_adapter(module, adapter[0], str(adapter[1]) if adapter[1] else None)
                else:
                    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                    module.save_pretrained(str(tmp), state_dict=state)
                if tokenizer is not None:
                    tokenizer.save_to(tmp)
                replace_dir(tmp, Path(out))
            except OSError as e:  # a full disk, a read-only folder: every rank must hear of it
                failed = e
    if any_rank(failed is not None):
        raise StrataError(f"{out}: the Hugging Face export failed ({failed or 'on rank 0'}); "
                          "the stage's checkpoints are intact, free space and run strata train again")
    barrier()
