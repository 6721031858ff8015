"""Hugging Face export of the model at the end of a stage: stages/NN-NAME/hf/.

The folder holds model.safetensors, config.json, generation_config.json and the tokenizer files,
so `AutoModelForCausalLM.from_pretrained(path, local_files_only=True)` loads it offline. Under
ZeRO-3 the parameters are partitioned across ranks, so every rank enters a GatheredParameters
context (a collective) and rank 0 writes. The folder is written under a temporary name and
renamed, like every other write of Strata.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist


def export_hf(engine: Any, tokenizer: Any, out: Path, rank: int) -> None:
    """Write the engine's model as a Hugging Face folder at `out` (all ranks must call this)."""
    module = engine.module
    gather: contextlib.AbstractContextManager = contextlib.nullcontext()
    if engine.zero_optimization_partition_weights():
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather:
        if rank == 0:
            out = Path(out)
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            module.save_pretrained(str(tmp), state_dict=state)
            if tokenizer is not None:
                tokenizer.save_to(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()
