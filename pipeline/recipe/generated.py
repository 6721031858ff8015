"""Recipe keys of generative replay: `replay: {ratio, generate: {...}}`, and the rules about them.

A stage whose team has the model but not the data it learned from replays text the model writes
itself (LAMOL, SSR, Marek et al. 2026's self-generated replay). `Generate` is the stage key;
`generated_source` names the one generated part of a stage (a source of its mixture, like a
replayed corpus, but never an evaluated domain); `check_generate` is its share of the recipe's
cross-field validation, by key path; `generation_cost` is what `strata check` prints.

Without `replay.from`, the whole replayed share is generated; with it, the generated part mixes
with the real replayed sources by weight (`replay.weights.generated`, default 1, beside the
sources' own weights). The generation itself lives in pipeline/train/generation.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.files import model_folder_problem
from pipeline.recipe.combinations import StageCheck, new_tokenizer
from pipeline.recipe.typed_yaml import spec

GENERATED = "generated"  # the generated part's name in `replay.weights`


@dataclass(kw_only=True)
class Generate:
    tokens: int = spec(gt=0, help="Tokens to generate (a budget: samples that end at EOS early make the set smaller; the manifest records what was written). The stage replays them for as many passes as its replay share needs.")
    temperature: float = spec(1.0, gt=0, help="Sampling temperature (1: the model's own distribution).")
    top_p: float = spec(1.0, gt=0, le=1, help="Nucleus sampling: keep the smallest set of tokens with this much probability (1: off).")
    top_k: int = spec(0, ge=0, help="Keep only the k most likely tokens (0: off).")
    max_new_tokens: int = spec(256, gt=0, help="Longest sample, in generated tokens; a sample ends earlier at EOS.")
    prompts: str = spec("bos", help="bos: unconditional samples, each started from the document start token (the tokenizer's BOS for a from_pretrained model that has one, else EOS, Strata's document separator); or a text file, one prompt per line (e.g. the first words of documents the team has), used in turn.")
    model: str = spec("previous", help="The generating model: previous (the model the stage starts from), init (the recipe's starting model), an earlier stage's name, or a local Hugging Face folder.")
    batch: int = spec(16, gt=0, help="Samples per generate call; a block of this many samples is the unit that is written and resumed.")
    engine: Literal["transformers", "vllm"] = spec("transformers", help="transformers: Hugging Face generate with a KV cache (bf16 on GPU); vllm: vLLM's engine (needs `pip install vllm`, CUDA and a model folder; each sample seeded, so the text is fixed by the seed but differs from transformers' within sampling noise).")


def generated_source(stage_name: str) -> str:
    """The name (and data folder) of stage `stage_name`'s generated part."""
    return f"{GENERATED}-{stage_name}"


def check_generate(stage: Any, check: StageCheck) -> None:
    """Cross-field checks of `stages[i].replay.generate` (the fields' own bounds are checked on load)."""
    i, names, recipe, problems = check.index, check.names, check.recipe, check.problems
    gen, gp = stage.replay.generate, f"stages[{i}].replay.generate"
    if gen.model is not None and gen.model not in ("previous", "init") and gen.model not in names[:i]:
        folder = check.resolve(gen.model, check.recipe_dir)
        if gen.model in names[i:]:
            problems.add(f"{gp}.model", f"{gen.model!r} is this or a later stage; name an earlier stage, previous or init")
        elif not folder.is_dir():
            problems.add(f"{gp}.model", f"{gen.model!r} is neither previous, init, an earlier stage, nor a Hugging "
                         "Face model folder")
        elif (why := model_folder_problem(folder)) is not None:
            problems.add(f"{gp}.model", why)
        else:
            gen.model = str(folder)
    if gen.prompts is not None and gen.prompts != "bos":
        path = check.resolve(gen.prompts, check.recipe_dir)
        if not path.is_file():
            problems.add(f"{gp}.prompts", f"is neither bos nor a file of prompts: {gen.prompts} not found")
        else:
            gen.prompts = str(path)
    if not stage.replay.ratio:
        problems.add(f"stages[{i}].replay.ratio", "is 0, so nothing generated would be replayed (give the generated share)")
    if gen.engine == "vllm" and gen.model == "init" and recipe.model is not None and recipe.model.from_pretrained is None:
        problems.add(f"{gp}.engine", "vllm loads a model folder; the recipe's initial model is built in memory "
                     "(use engine: transformers)")
    if new_tokenizer(recipe, i):
        problems.add(gp, "cannot be used in a stage that changes the tokenizer (the generating model writes the "
                     "ids of the tokenizer before it)")


def generation_cost(gen: Generate, params: int | None) -> str:
    """What the generation costs, for `strata check`: samples, and forward FLOPs (2 x params per token)."""
    samples = math.ceil(gen.tokens / gen.max_new_tokens)
    line = (f"{gen.tokens:,} tokens in {samples:,} samples of <= {gen.max_new_tokens} tokens "
            f"({math.ceil(samples / gen.batch):,} blocks of {gen.batch}), temperature {gen.temperature:g}, "
            f"top_p {gen.top_p:g}, top_k {gen.top_k or 'off'}, prompts {gen.prompts}, model {gen.model}")
    if params:
        line += f"; ~{2 * params * gen.tokens / 1e12:.3g} TFLOP of forward passes (KV cache, one token at a time)"
    return line
