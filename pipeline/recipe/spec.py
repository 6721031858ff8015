"""The data recipe: one YAML file, loaded into typed dataclasses and validated all at once.

The dataclasses below are the single source of truth for the recipe: the loader walks their type
hints, the JSON Schema (`strata schema`) is generated from them, and the `help` text of each field
is both its documentation and its schema description. Loading and the cross-field checks live in
recipe/load.py: validation never stops at the first problem, every error is collected with its
key path (`stages[1].sources[0].weight: must be > 0`) and reported together, as litgpt's
`validate_args` does.

Relative paths (tokenizer, sources, model) are resolved against the working directory, then
against the recipe's own folder; the recipe keeps the paths as written in `raw` (for hashing),
while the dataclasses hold resolved absolute paths.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.files import short_hash
from pipeline.recipe.forgetting import Distill, Merge, Regularize
from pipeline.recipe.generated import GENERATED, Generate
from pipeline.recipe.typed_yaml import passthrough, spec

# --------------------------------------------------------------------------------------------
# The recipe.

PRETRAINING = "pretraining"  # the `pretraining:` sources, as a replay origin learned before stage 0


@dataclass(kw_only=True)
class ModelInit:
    arch: Literal["llama"] = spec("llama", help="Architecture of a freshly initialised model.")
    hidden_size: int = spec(128, gt=0, help="Width of the residual stream.")
    num_layers: int = spec(4, gt=0, help="Number of transformer blocks.")
    num_heads: int = spec(4, gt=0, help="Attention heads.")
    num_kv_heads: int | None = spec(None, gt=0, help="Key/value heads (grouped-query attention); default num_heads.")
    intermediate_size: int = spec(352, gt=0, help="Width of the MLP.")
    rope_theta: float = spec(10000.0, gt=0, help="RoPE base.")
    tie_embeddings: bool = spec(False, help="Share the input embedding and the LM head.")
    init_std: float = spec(0.02, gt=0, help="Standard deviation of the initial weights.")


@dataclass(kw_only=True)
class Model:
    init: ModelInit | None = spec(None, help="Build a new model from this config (seeded).")
    from_pretrained: str | None = spec(None, help="A local Hugging Face folder to start from (never downloaded).")
    trust_remote_code: bool = spec(False, help="Let from_pretrained run Python code shipped in the model folder (only for folders you trust).")


@dataclass(kw_only=True)
class Batch:
    micro: int = spec(gt=0, help="Sequences per rank per forward pass.")
    global_: int = spec(key="global", gt=0, help="Sequences per optimizer step, over all ranks: micro x grad_accum x world_size.")


@dataclass(kw_only=True)
class DeepSpeed:
    zero_stage: int = spec(0, help="ZeRO stage: 0 (off), 1 (optimizer states partitioned over the ranks), 2 (and gradients) or 3 (and parameters).")
    config: dict[str, Any] = passthrough(help="Any other key of DeepSpeed's config, passed through as written (`zero_optimization` adds to zero_stage; the batch sizes are computed from `batch:`).")


@dataclass(kw_only=True)
class Dedup:
    method: Literal["exact", "minhash"] = spec("minhash", help="exact: drop documents whose normalised text (NFKC, lower case, words only) repeats an earlier one; minhash: also near duplicates, by MinHash-LSH over word n-grams (datasketch).")
    threshold: float = spec(0.8, gt=0, le=1, help="minhash: estimated Jaccard similarity of two documents' word n-gram sets at or above which the later one is a near duplicate.")
    ngram: int = spec(5, gt=0, help="minhash: words per n-gram (shingle).")
    num_perm: int = spec(128, gt=0, help="minhash: permutations per signature (more: a finer Jaccard estimate, bigger signatures).")
    across_stages: bool = spec(True, help="Also drop a document that repeats one of an earlier stage (or of pretraining:); always within a source and across the sources of a stage.")


@dataclass(kw_only=True)
class SourceDedup:
    method: Literal["none", "exact", "minhash"] | None = spec(None, help="How this source's documents are tested (none: kept, but later documents are still tested against them); default data.dedup.method.")
    threshold: float | None = spec(None, gt=0, le=1, help="minhash: this source's near-duplicate threshold; default data.dedup.threshold.")


@dataclass(kw_only=True)
class Decontamination:
    ngram: int = spec(13, gt=0, help="Words per n-gram: an evaluation item sharing one with a training document is contaminated (13, as GPT-3 and lm-eval).")
    sample: int = spec(1, gt=0, help="Index 1 in `sample` n-grams (by hash) of the training data: an index 1/sample the size; an item is still found when it shares about `sample` or more n-grams.")
    warn: float = spec(0.01, ge=0, le=1, help="`strata check` and the report warn when a set's contaminated share is above this.")


@dataclass(kw_only=True)
class Data:
    dir: str | None = spec(None, help="Where `strata prepare` writes shards; default data/<recipe name>.")
    shard_tokens: int = spec(1 << 24, gt=0, help="Tokens per shard file (the last shard of a source is smaller).")
    heldout: float = spec(0.01, ge=0, lt=0.5, help="Share of each source's documents held out for evaluation (by document hash).")
    max_passes: float = spec(4.0, gt=0, help="`strata check` refuses a stage that replays a source more often than this, and warns when a stage reads one of its own sources more often.")
    buffer_mb: int = spec(1024, gt=0, help="Decompressed shard buffers the stream keeps per process (MiB), over all sources; past it the least recently used go and are read again when needed (a stage mixing many sources; docs/scale.md).")
    dedup: Dedup | None = spec(None, help="Drop exact / near-duplicate documents of the training sources at prepare time; the first occurrence in recipe order (pretraining:, then the stages) is kept, and no held-out document keeps a near duplicate in any training split.")
    decontamination: Decontamination = spec(factory=Decontamination, help="The hashed n-gram index of each training source (made at prepare time) that every evaluation set is checked against.")


@dataclass(kw_only=True)
class Checkpoint:
    every: int = spec(100, ge=0, help="Mid-stage checkpoint every N optimizer steps (0: only at stage ends).")
    keep: int = spec(2, ge=1, help="How many mid-stage checkpoints to keep; stage-end checkpoints are always kept.")


@dataclass(kw_only=True)
class Train:
    weight_decay: float = spec(0.1, ge=0, help="AdamW weight decay.")
    betas: list[float] = spec(factory=lambda: [0.9, 0.95], help="AdamW betas.")
    eps: float = spec(1e-8, gt=0, help="AdamW epsilon.")
    grad_clip: float = spec(1.0, ge=0, help="Gradient clipping by global norm (0: off).")
    log_every: int = spec(1, gt=0, help="Log a metrics line every N steps.")
    tensorboard: bool = spec(False, help="Also write TensorBoard events to RUN_DIR/tensorboard.")
    wandb: bool = spec(False, help="Also log to Weights & Biases (project from WANDB_PROJECT, default 'strata'; WANDB_MODE=offline is respected).")
    eval_tokens: int | None = spec(None, gt=0, help="Evaluate at most this many tokens per domain (the first, in shard order); default all.")
    num_workers: int = spec(0, ge=0, help="DataLoader worker processes for the stream.")
    dtype: Literal["auto", "fp32", "bf16"] = spec("auto", help="auto: bf16 on GPU, fp32 on CPU.")
    max_bad_steps: int = spec(5, gt=0, help="Stop after this many consecutive steps with a NaN/inf loss (each is skipped).")
    activation_checkpointing: bool | int = spec(
        False, help="Recompute activations in the backward: true (every block), N (every N-th block) or false.")
    attention: Literal["auto", "sdpa", "flash_attention_2", "flex_attention", "eager"] = spec(
        "auto", help="Attention kernel; auto: flash_attention_2 on CUDA where installed, else sdpa. All keep packed documents apart.")
    compile: bool = spec(False, help="torch.compile every transformer block.")
    peak_tflops: float | None = spec(None, gt=0, help="The device's peak bf16 TFLOP/s for MFU; default from a table of known GPUs (none on CPU).")


@dataclass(kw_only=True)
class Export:
    dtype: Literal["auto", "fp32", "bf16"] = spec("auto", help="Weights of each stage's Hugging Face export: auto = the training dtype (train.dtype), or fp32 / bf16.")


@dataclass(kw_only=True)
class Source:
    name: str = spec(help="Unique name of the source in the recipe.")
    path: str = spec(help="A .jsonl, .jsonl.zst, .parquet or .txt file, a folder of them, or a HF dataset saved with save_to_disk.")
    weight: float = spec(1.0, gt=0, help="Share of the stage's tokens, relative to the other sources of the stage.")
    text_field: str = spec("text", help="Column/field holding the document text.")
    split: str = spec("train", help="Split to read when `path` is a saved HF DatasetDict.")
    date_field: str | None = spec(None, help="Column/field holding the document date (ISO 8601).")
    from_: dt.date | None = spec(None, key="from", help="Keep documents dated on or after this day.")
    to: dt.date | None = spec(None, help="Keep documents dated on or before this day.")
    on_error: Literal["skip", "fail"] = spec("skip", help="Malformed records: skip and count them, or stop.")
    template: str | None = spec(None, help="Jinja2 template rendering each record to its text (sandboxed, strict: a record missing a field it uses is malformed); replaces text_field.")
    format: Literal["key_value", "json"] | None = spec(None, help="Render every field of each record without a template: `key: value` lines, or compact JSON; replaces text_field.")
    dedup: SourceDedup | None = spec(None, help="This source's deduplication, over data.dedup (which must be set).")


@dataclass(kw_only=True)
class Replay:
    ratio: float = spec(ge=0, lt=1, help="Share of the stage's tokens drawn from earlier stages' sources (or generated).")
    from_: list[str] | None = spec(None, key="from", help="Earlier stages to replay; default all earlier stages (none with generate: the whole share is generated).")
    weights: dict[str, float] | None = spec(None, help="Relative weights of the replayed sources by name (and of `generated`, default 1); default their own weights.")
    mode: Literal["continue", "resample"] = spec(
        "continue", help="continue: read each old source on from its cursor; resample: draw again from what was seen.")
    generate: Generate | None = spec(None, help="Generative replay: replay text the model writes itself (for a team without the old data); generated before the stage trains, or by `strata generate`.")


@dataclass(kw_only=True)
class Selection:
    method: Literal["rho1"] = spec("rho1", help="Token selection method.")
    ratio: float = spec(0.6, gt=0, le=1, help="Share of tokens kept for the loss.")
    reference: str = spec(help="Reference model: a finished stage of this run, or a local HF folder.")
    scoring: Literal["online", "precomputed"] = spec("online", help="Reference losses computed in the step, or by `strata score`.")
    scope: Literal["global_batch", "micro_batch"] = spec("global_batch", help="Over which tokens the top-k is ranked.")


@dataclass(kw_only=True)
class Expand:
    method: Literal["llama_pro", "width", "moe"] = spec("llama_pro", help="Depth (LLaMA-Pro identity blocks), width expansion, or mixture of experts (upcycling / added experts).")
    add_layers: int | None = spec(None, gt=0, help="Blocks to insert (llama_pro).")
    freeze_old: bool = spec(True, help="Train only the new blocks (llama_pro).")
    hidden_size: int | None = spec(None, gt=0, help="New width (width).")
    intermediate_size: int | None = spec(None, gt=0, help="New MLP width (width).")
    noise: float = spec(0.0, ge=0, help="Width: zero-sum jitter of the split outgoing weights, so copied units can diverge (the function is still preserved).")
    experts: int | None = spec(None, gt=1, help="moe: upcycle every dense MLP into this many experts (a Mixtral).")
    top_k: int = spec(2, gt=0, help="moe: experts per token (their routing weights are renormalised to sum to 1).")
    add_experts: int | None = spec(None, gt=0, help="moe: add this many experts to an MoE model (copies of existing ones); freeze_old trains only them and the router.")
    aux_loss_coef: float | None = spec(None, ge=0, help="moe: weight of the router's load-balancing loss in the training loss (default 0.01 at upcycling; kept from the model otherwise).")


@dataclass(kw_only=True)
class Schedule:
    max_lr: float = spec(gt=0, help="Peak learning rate, reached at the end of warmup.")
    min_lr: float = spec(0.0, ge=0, help="Learning rate at the start of warmup and at the end of decay.")
    warmup: float = spec(0.01, ge=0, help="Warmup: a fraction of the stage's steps if < 1, else a number of steps.")
    decay: Literal["cosine", "linear", "constant", "wsd"] = spec("cosine", help="Shape after warmup.")
    decay_fraction: float = spec(0.2, gt=0, le=1, help="wsd: share of the stage's steps spent decaying at the end.")


@dataclass(kw_only=True)
class Stage:
    name: str = spec(help="Unique stage name; used in the run folder (stages/NN-NAME).")
    sources: list[Source] = spec(help="The stage's own corpora.")
    tokens: int | None = spec(None, gt=0, help="Token budget; default one pass over the stage's own sources.")
    schedule: Schedule | None = spec(None, help="Learning-rate schedule, re-warmed at the start of the stage.")
    replay: Replay | None = spec(None, help="Replay of earlier stages' sources, as a share of this stage's tokens.")
    selection: Selection | None = spec(None, help="RHO-1 token selection.")
    expand: Expand | None = spec(None, help="Grow the model when the stage starts.")
    tokenizer: str | None = spec(None, help="A new tokenizer from this stage on; it must extend the one before it (every old id keeps its piece). The embeddings grow at the stage start, new rows at the mean.")
    reset_optimizer: bool = spec(True, help="Start the stage with a fresh optimizer state.")
    distill: Distill | None = spec(None, help="Distil from an earlier model (LwF): CE + w * T^2 * KL(teacher || student).")
    regularize: Regularize | None = spec(None, help="Pull the weights towards those the stage started from (l2 or ewc).")
    merge: Merge | None = spec(None, help="At the stage end, merge the trained weights with an earlier model.")
    trainable: list[str] | None = spec(None, help="Globs over parameter names (model.embed_tokens.*, lm_head.*, model.layers.*.mlp.*): only these train, the rest are frozen; with an adapter or freeze_old they add to what trains.")
    adapter: dict[str, Any] | None = spec(None, help="An adapter trained on the frozen model: {type: lora | ia3 | llama_adapter | bottleneck | prompt_tuning | prefix_tuning, ...}: lora (r, alpha, dropout, targets; other keys pass to peft's LoraConfig: use_dora, use_rslora, ...) and ia3 (targets, feedforward) are merged into the weights at the stage end; llama_adapter (length, layers), bottleneck (size, placement: houlsby | pfeiffer), prompt_tuning and prefix_tuning (length: virtual tokens before each packed document) are exported beside the base model (adapter/).")


@dataclass(kw_only=True)
class Evaluation:
    tasks: list[str] = spec(factory=list, help="Downstream tasks run with lm-evaluation-harness on the initial model and after every stage: a harness task name, or the path of a local task YAML in lm-eval's format. Needs the harness extra (pip install 'strata-cpt[harness]').")
    num_fewshot: int = spec(0, ge=0, help="Few-shot examples per task prompt.")
    limit: float | None = spec(None, gt=0, help="Examples per task: a count (>= 1) or a fraction (< 1); default all.")
    batch_size: int | str = spec("auto", help="The harness's batch size: a number, or auto (largest that fits).")
    stage: dict[str, str] = spec(factory=dict, help="Task name -> the stage whose domain it measures; such tasks enter the continual-learning metrics (the others belong to no stage, like eval: sets).")
    decontaminate: Literal["report", "drop"] = spec("report", help="report: store and show each evaluation set's share of items sharing an n-gram with the training data up to each stage (data.decontamination); drop: also score the tasks after a stage without those items (their ids are listed in eval.json).")


# `train:` keys that do not change what a started stage computes (logging, evaluation, data
# loading and stopping policy): they may change between a run and its resume. Every other `train:`
# key, and all of `deepspeed:`, is part of the stage hash (docs/failures.md).
CHANGEABLE_TRAIN_KEYS = frozenset({"log_every", "tensorboard", "wandb", "eval_tokens", "num_workers",
                                   "max_bad_steps", "peak_tflops"})


@dataclass(kw_only=True)
class Recipe:
    name: str = spec(help="Name of the recipe (and default data folder).")
    tokenizer: str = spec(help="A sentencepiece .model file or a Hugging Face tokenizer folder.")
    model: Model = spec(help="The model to train.")
    seq_len: int = spec(gt=0, help="Tokens per training sequence.")
    batch: Batch = spec(help="Batch sizes, in sequences.")
    stages: list[Stage] = spec(help="The stages, trained in order.")
    seed: int = spec(1234, help="Seeds the model init, the document shuffles and the run.")
    deepspeed: DeepSpeed = spec(factory=DeepSpeed, help="zero_stage, plus anything DeepSpeed's config accepts.")
    data: Data = spec(factory=Data, help="Where and how shards are written.")
    checkpoint: Checkpoint = spec(factory=Checkpoint, help="Checkpoint cadence and retention.")
    train: Train = spec(factory=Train, help="Optimizer and logging.")
    eval: list[Source] = spec(factory=list, help="Extra evaluation sets, never trained on: all their documents are evaluated after every stage.")
    pretraining: list[Source] = spec(factory=list, help="A sample of the corpus the starting model learned from: never a stage of its own, replayable from stage 1 (`replay: {from: [pretraining]}`) and evaluated as old domains from the start.")
    evaluation: Evaluation = spec(factory=Evaluation, help="Downstream tasks (lm-evaluation-harness) after every stage.")
    export: Export = spec(factory=Export, help="How each stage's Hugging Face export (stages/NN-NAME/hf) is written.")
    # Not recipe keys: filled in by load_recipe.
    file: str = field(default="", metadata={"internal": True})
    raw: dict = field(default_factory=dict, metadata={"internal": True})

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else Path("data") / self.name

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def stage_index(self, name: str) -> int:
        return [s.name for s in self.stages].index(name)

    def all_sources(self) -> list[Source]:
        """Every source to prepare: the stages' sources, the `eval:` sets, then the `pretraining:` sources."""
        return [src for stage in self.stages for src in stage.sources] + list(self.eval) + list(self.pretraining)

    @property
    def zero_stage(self) -> int:
        """`deepspeed.zero_stage` (0 when absent; load.py checks it is 0-3)."""
        return self.deepspeed.zero_stage

    def tokenizer_at(self, index: int) -> str:
        """The tokenizer in force at stage `index`: the last stage tokenizer at or before it, else the recipe's."""
        for stage in reversed(self.stages[:index + 1]):
            if stage.tokenizer is not None:
                return stage.tokenizer
        return self.tokenizer

    def tokenizers(self) -> list[str]:
        """Every tokenizer of the recipe, the recipe's first, each once."""
        out = [self.tokenizer]
        for i in range(len(self.stages)):
            if self.tokenizer_at(i) not in out:
                out.append(self.tokenizer_at(i))
        return out

    # The one replay rule: what stage `index` replays. The plan mixes by it and load.py checks
    # `replay.weights` by it, on a recipe still being checked too: a stage or source that failed to
    # load is None there, and a replayed name may be unknown (it is reported; it replays nothing).

    def replay_stages(self, index: int) -> list[str]:
        """Names of the earlier stages (and PRETRAINING) that stage `index` replays (empty without replay)."""
        replay = self.stages[index].replay
        if replay is None:
            return []
        if replay.from_ is not None:
            return list(replay.from_)
        if replay.generate is not None:  # no old data named: the replayed share is all generated
            return []
        return ([PRETRAINING] if self.pretraining else []) + [s.name for s in self.stages[:index] if s is not None]

    def replayed_sources(self, index: int) -> list[tuple[str, Source]]:
        """(stage name or PRETRAINING, source) of every source stage `index` replays, in plan order."""
        out = []
        for name in self.replay_stages(index):
            earlier = [s for s in self.stages[:index] if s is not None and s.name == name][:1]
            sources = self.pretraining if name == PRETRAINING else earlier[0].sources if earlier else []
            out += [(name, src) for src in sources or [] if src is not None]
        return out

    def replay_weight_names(self, index: int) -> list[str]:
        """What stage `index`'s `replay.weights` may weigh: its replayed sources, and GENERATED
        when it generates (`replay.generate`)."""
        replay = self.stages[index].replay
        generated = [GENERATED] if replay is not None and replay.generate is not None else []
        return [src.name for _, src in self.replayed_sources(index)] + generated

    def stage_hash(self, index: int) -> str:
        """Hash of everything that decides what stage `index` trains on and how.

        Covers the stage's own section and the run-wide keys that shape every stage's numbers
        (model, tokenizer, seq_len, batch, seed, `deepspeed:` and `train:` except the keys in
        CHANGEABLE_TRAIN_KEYS). A started stage whose hash changed is refused on resume.
        """
        shared = {k: self.raw.get(k) for k in ("tokenizer", "model", "seq_len", "batch", "seed")}
        train = {k: v for k, v in (self.raw.get("train") or {}).items() if k not in CHANGEABLE_TRAIN_KEYS}
        # Only when set, so that hashes of runs started before these keys were covered stay valid.
        shared.update({k: v for k, v in (("train", train), ("deepspeed", self.raw.get("deepspeed"))) if v})
        parts = [shared, self.raw["stages"][index]]
        named = [s.get("tokenizer") for s in self.raw["stages"][:index + 1] if isinstance(s, dict) and s.get("tokenizer")]
        if named:  # a tokenizer inherited from an earlier stage shapes this stage too
            parts.append({"tokenizer_in_force": named[-1]})
        fisher = index == 0 and self.stages[0].regularize is not None and self.stages[0].regularize.method == "ewc"
        if PRETRAINING in self.replay_stages(index) or fisher:  # what the stage replays (or its Fisher reads)
            parts.append({PRETRAINING: self.raw.get(PRETRAINING)})
        return short_hash(parts, sort_keys=True)
