"""Hugging Face export of the model at the end of a stage: stages/NN-NAME/hf/.

The folder holds model.safetensors, config.json, generation_config.json and the tokenizer files,
so `AutoModelForCausalLM.from_pretrained(path, local_files_only=True)` loads it offline. Under
ZeRO-3 the parameters are partitioned across ranks, so every rank enters a GatheredParameters
context (a collective) and rank 0 writes. The folder is written under a temporary name and
renamed, like every other write of Strata.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.distributed import any_rank, barrier
from pipeline.errors import StrataError
from pipeline.files import replace_dir, temp_dir_for


def state_in_config(folder: Path, dtype: torch.dtype) -> None:
    """config.json as an export states it: the dtype of its weights (save_pretrained infers the
    training module's) and `use_cache: true` (the training model runs without the cache)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(use_cache=True, dtype=str(dtype).removeprefix("torch."))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_dtype(setting: str, training: torch.dtype) -> torch.dtype:
    """`export.dtype`: auto is the dtype the stage trained in."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(setting, training)


def export_hf(engine: Any, tokenizer: Any, out: Path, rank: int,
              adapter: tuple[Path, Path | None] | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Write the engine's model as a Hugging Face folder at `out` (all ranks must call this).

    `adapter` = (folder, base export) for a peft model: `out` gets the merged plain model and the
    folder the unmerged adapter (pipeline/model/adapters.py). The weights are written in `dtype`;
    config.json says so (`dtype`) and has `use_cache: true`, so that `generate()` on the export
    reuses its key/value cache (training runs without it)."""
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
                    from pipeline.model.adapters import export_parts

                    plain, state = export_parts(module, adapter[0], str(adapter[1]) if adapter[1] else None)
                else:
                    plain, state = module, module.state_dict()
                state = {k: v.detach().cpu().to(dtype if v.is_floating_point() else v.dtype, copy=True)
                         for k, v in state.items()}
                with no_hf_progress_bar():  # its "Writing model shards" bar is noise in train logs
                    plain.save_pretrained(str(tmp), state_dict=state)
                state_in_config(tmp, dtype)
                if tokenizer is not None:
                    tokenizer.save_to(tmp)
                replace_dir(tmp, Path(out))
            except OSError as e:  # a full disk, a read-only folder: every rank must hear of it
                failed = e
    if any_rank(failed is not None):
        raise StrataError(f"{out}: the Hugging Face export failed ({failed or 'on rank 0'}); "
                          "the stage's checkpoints are intact, free space and run strata train again")
    barrier()


@contextlib.contextmanager
def no_hf_progress_bar() -> Iterator[None]:
    """transformers' progress bars off for the call, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
