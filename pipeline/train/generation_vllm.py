"""Generative replay with vLLM (`replay.generate.engine: vllm`): the same blocks, another engine.

Optional: vLLM is imported only here, only when a recipe asks for it (install it beside Strata on
a CUDA machine: `pip install vllm`). Each rank loads the generating model folder in its own vLLM
engine on its own GPU and writes its blocks exactly as the transformers path does
(pipeline/train/generation.py: block files, resume, manifest). Every sample gets its own seed
(recipe seed, stage, sample index), so the text is fixed by the seed and by nothing else (not by
the block a sample falls in, nor the rank); it differs from the transformers engine's within
sampling noise, and the engine is part of the settings recorded in gen.json.

Not exercised by Strata's test suite (no CUDA there); the transformers engine is.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from pipeline.data.shards import token_dtype
from pipeline.errors import StrataError


def vllm_blocks(job, todo: list[int], prompts: list[list[int]], write_block: Callable) -> None:
    """Generate and write blocks `todo` of `job` (a GenerationJob) with vLLM."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise StrataError(f"{job.recipe.file}: stages[{job.index}].replay.generate.engine is vllm, but vLLM is not "
                          "installed (pip install vllm; CUDA only), or use engine: transformers") from None
    if job.model_path is None:
        raise StrataError(f"{job.recipe.file}: stages[{job.index}].replay.generate.engine vllm needs a model folder")
    spec, eos = job.spec, job.tokenizer.eos_id
    llm = LLM(model=str(job.model_path), dtype="bfloat16", seed=job.recipe.seed, skip_tokenizer_init=True)
    keep_prompt = spec.prompts != "bos"
    for k in todo:
        first, last = k * spec.batch, min((k + 1) * spec.batch, job.samples)
        chosen = [prompts[j % len(prompts)] for j in range(first, last)]
        params = [SamplingParams(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k or -1,
                                 max_tokens=spec.max_new_tokens, stop_token_ids=[eos], detokenize=False,
                                 seed=zlib.crc32(f"{job.recipe.seed}/{job.index}/{j}".encode()))
                  for j in range(first, last)]
        outputs = llm.generate([{"prompt_token_ids": p} for p in chosen], params, use_tqdm=False)
        samples = []
        for p, out in zip(chosen, outputs):
            new = [t for t in out.outputs[0].token_ids if t != eos]
            samples.append(np.asarray((p if keep_prompt else []) + new, dtype=token_dtype(job.tokenizer.vocab_size)))
        write_block(job, k, samples)
