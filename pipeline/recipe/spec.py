"""The data recipe: one YAML file, loaded into typed dataclasses and validated all at once.

The dataclasses below are the single source of truth for the recipe: the loader walks their type
hints, the JSON Schema (`strata schema`) is generated from them, and the `help` text of each field
is both its documentation and its schema description. Validation never stops at the first
problem: every error is collected with its key path (`stages[1].sources[0].weight: must be > 0`)
and reported together, as litgpt's `validate_args` does.

Relative paths (tokenizer, sources, model) are resolved against the working directory, then
against the recipe's own folder; the recipe keeps the paths as written in `raw` (for hashing),
while the dataclasses hold resolved absolute paths.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import RecipeError
from pipeline.recipe.combinations import frozen_embeddings
from pipeline.recipe.forgetting import Distill, Merge, Regularize, check_stage_defences
from pipeline.recipe.typed_yaml import BAD, Problems, dataclass_schema, load_dataclass, spec
from pipeline.recipe.yaml_file import read_yaml

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
class Data:
    dir: str | None = spec(None, help="Where `strata prepare` writes shards; default data/<recipe name>.")
    shard_tokens: int = spec(1 << 24, gt=0, help="Tokens per shard file (the last shard of a source is smaller).")
    heldout: float = spec(0.01, ge=0, lt=0.5, help="Share of each source's documents held out for evaluation (by document hash).")
    max_passes: float = spec(4.0, gt=0, help="`strata check` warns when a stage reads a source more often than this.")


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


@dataclass(kw_only=True)
class Replay:
    ratio: float = spec(ge=0, lt=1, help="Share of the stage's tokens drawn from earlier stages' sources.")
    from_: list[str] | None = spec(None, key="from", help="Earlier stages to replay; default all earlier stages.")
    weights: dict[str, float] | None = spec(None, help="Relative weights of the replayed sources by name; default their own weights.")
    mode: Literal["continue", "resample"] = spec(
        "continue", help="continue: read each old source on from its cursor; resample: draw again from what was seen.")


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
    adapter: dict[str, Any] | None = spec(None, help="A peft adapter trained on the frozen model: {type: lora, r, alpha, dropout, targets}; other keys pass to peft's LoraConfig (use_dora, use_rslora, ...). Merged into the weights at the stage end.")


@dataclass(kw_only=True)
class Evaluation:
    tasks: list[str] = spec(factory=list, help="Downstream tasks run with lm-evaluation-harness on the initial model and after every stage: a harness task name, or the path of a local task YAML in lm-eval's format. Needs the harness extra (pip install 'strata-cpt[harness]').")
    num_fewshot: int = spec(0, ge=0, help="Few-shot examples per task prompt.")
    limit: float | None = spec(None, gt=0, help="Examples per task: a count (>= 1) or a fraction (< 1); default all.")
    batch_size: int | str = spec("auto", help="The harness's batch size: a number, or auto (largest that fits).")
    stage: dict[str, str] = spec(factory=dict, help="Task name -> the stage whose domain it measures; such tasks enter the continual-learning metrics (the others belong to no stage, like eval: sets).")


# `train:` keys that do not change what a started stage computes (logging, evaluation, data
# loading and stopping policy): they may change between a run and its resume. Every other `train:`
# key, and all of `deepspeed:`, is part of the stage hash (README: "Failure guarantees").
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
    deepspeed: dict[str, Any] = spec(factory=dict, help="zero_stage, plus anything DeepSpeed's config accepts.")
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

    def learned_sources(self, name: str) -> list[Source]:
        """The sources of stage `name`, or of PRETRAINING (learned before the first stage)."""
        return list(self.pretraining) if name == PRETRAINING else list(self.stage(name).sources)

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

    def replay_stages(self, index: int) -> list[str]:
        """Names of the earlier stages that stage `index` replays (empty without replay)."""
        replay = self.stages[index].replay
        if replay is None:
            return []
        if replay.from_ is not None:
            return list(replay.from_)
        return ([PRETRAINING] if self.pretraining else []) + [s.name for s in self.stages[:index]]

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
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Cross-field checks: names, files, arithmetic, references between stages.


def _resolve(path: str, recipe_dir: Path) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    alt = recipe_dir / p
    return alt.resolve() if alt.exists() else p.resolve()


# Keys of DeepSpeed's config that Strata computes from the recipe.
_COMPUTED_DS_KEYS = {
    "train_batch_size": "batch.global",
    "train_micro_batch_size_per_gpu": "batch.micro",
    "gradient_accumulation_steps": "batch.global / (batch.micro x world size)",
}


def _check(recipe: Recipe, recipe_dir: Path, problems: Problems) -> None:
    """Checks across fields. Parts that failed to load are None here and are skipped."""
    batch = recipe.batch
    if batch is not None and batch.micro and batch.global_ and batch.global_ % batch.micro:
        problems.add("batch.global", f"must be a multiple of batch.micro ({batch.micro}), got {batch.global_}")

    zero = recipe.deepspeed.get("zero_stage", 0)
    if zero not in (0, 1, 2, 3):
        problems.add("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {zero!r}")
    for key, instead in _COMPUTED_DS_KEYS.items():
        if key in recipe.deepspeed:
            problems.add(f"deepspeed.{key}", f"is computed by Strata; set {instead} instead")

    ckpt = recipe.train.activation_checkpointing if recipe.train is not None else False
    if not isinstance(ckpt, bool) and (not isinstance(ckpt, int) or ckpt < 1):
        problems.add("train.activation_checkpointing", f"must be true, false or an integer >= 1, got {ckpt!r}")
    if recipe.model is not None:
        _check_model(recipe.model, recipe_dir, problems)
    if recipe.tokenizer is not None:
        tok = _resolve(recipe.tokenizer, recipe_dir)
        if not tok.exists():
            problems.add("tokenizer", f"file or folder not found: {recipe.tokenizer}")
        recipe.tokenizer = str(tok)

    stages = recipe.stages or []
    if recipe.stages is not None and not stages:
        problems.add("stages", "must list at least one stage")
    names = [s.name if s is not None else None for s in stages]
    seen_sources: dict[str, str] = {}
    learned = [PRETRAINING] if recipe.pretraining else []  # replayable like a stage before stage 0
    for i, stage in enumerate(stages):
        if stage is not None:
            _check_stage(stage, i, names, recipe_dir, seen_sources, problems, learned, recipe)
            if stage.replay is not None and stage.replay.weights is not None:
                _check_replay_weights(recipe, i, problems)
    for j, src in enumerate(recipe.eval or []):  # eval sets share the source namespace (data folders)
        if src is not None:
            _check_source(src, f"eval[{j}]", recipe_dir, seen_sources, problems)
    for j, src in enumerate(recipe.pretraining or []):
        if src is not None:
            _check_source(src, f"pretraining[{j}]", recipe_dir, seen_sources, problems)
    if recipe.evaluation is not None:
        _check_evaluation(recipe.evaluation, [s.name for s in stages if s is not None], recipe_dir, problems)
    if not problems and any(s.tokenizer is not None for s in stages):
        _check_stage_tokenizers(recipe, problems)


def _check_stage_tokenizers(recipe: Recipe, problems: Problems) -> None:
    """What the recipe alone can say about stage tokenizers; pipeline/data/tokenizer.py's
    `check_tokenizers` then reads the files (each must extend the one before it)."""
    before = recipe.tokenizer
    for i, stage in enumerate(recipe.stages):
        if stage.tokenizer is None or stage.tokenizer == before:
            continue
        frozen = frozen_embeddings(stage)  # the new pieces' rows would never train
        if frozen == "expand.freeze_old":
            problems.add(f"stages[{i}].expand.freeze_old", "must be false in a stage that adds tokenizer pieces "
                         "(the frozen embeddings would keep the new rows at their initial mean)")
        elif frozen is not None:
            problems.add(f"stages[{i}].{frozen}", "freezes the embeddings in a stage that adds tokenizer pieces (the "
                         "new rows would stay at their initial mean): add model.embed_tokens.* and lm_head.* to trainable")
        before = stage.tokenizer


def _check_replay_weights(recipe: Recipe, i: int, problems: Problems) -> None:
    replay = recipe.stages[i].replay
    from_ = replay.from_ if replay.from_ is not None else [s.name for s in recipe.stages[:i] if s is not None]
    replayed = [src.name for st in recipe.stages[:i] if st is not None and st.name in from_
                for src in (st.sources or []) if src is not None]
    if replay.from_ is None or PRETRAINING in replay.from_:
        replayed += [src.name for src in recipe.pretraining or [] if src is not None]
    for name, weight in replay.weights.items():
        path = f"stages[{i}].replay.weights.{name}"
        if name not in replayed:
            hint = difflib.get_close_matches(str(name), replayed, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.add(path, f"is not a source of the replayed stages{extra}")
        elif not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            problems.add(path, f"must be a number >= 0, got {weight!r}")
    if replayed and all(not replay.weights.get(n) for n in replayed):
        problems.add(f"stages[{i}].replay.weights", "must give at least one replayed source a weight > 0")


def _check_model(model: Model, recipe_dir: Path, problems: Problems) -> None:
    if (model.init is None) == (model.from_pretrained is None):
        problems.add("model", "give exactly one of init or from_pretrained")
    init = model.init
    if init is not None and init.hidden_size and init.num_heads:
        heads, kv = init.num_heads, init.num_kv_heads or init.num_heads
        if init.hidden_size % heads:
            problems.add("model.init.hidden_size", f"must be a multiple of num_heads ({heads})")
        if heads % kv:
            problems.add("model.init.num_kv_heads", f"must divide num_heads ({heads})")
    if model.from_pretrained is not None:
        resolved = _resolve(model.from_pretrained, recipe_dir)
        if not (resolved / "config.json").is_file():
            problems.add("model.from_pretrained", f"no Hugging Face model folder (config.json) at {resolved}")
        model.from_pretrained = str(resolved)


def _check_stage(stage: Stage, i: int, names: list[str | None], recipe_dir: Path, seen_sources: dict[str, str],
                 problems: Problems, learned: list[str], recipe: Recipe) -> None:
    sp = f"stages[{i}]"
    if stage.name == "init":  # eval.json and the report call the model before any stage "init"
        problems.add(f"{sp}.name", "'init' is reserved for the model before the first stage")
    if stage.name == PRETRAINING:
        problems.add(f"{sp}.name", f"{PRETRAINING!r} is reserved for the recipe's `pretraining:` sources")
    if stage.name is not None and stage.name in names[:i]:
        problems.add(f"{sp}.name", f"duplicate stage name {stage.name!r} (also stages[{names.index(stage.name)}])")
    if stage.sources is not None and not stage.sources:
        problems.add(f"{sp}.sources", "must list at least one source")
    if stage.tokenizer is not None:
        tok = _resolve(stage.tokenizer, recipe_dir)
        if not tok.exists():
            problems.add(f"{sp}.tokenizer", f"file or folder not found: {stage.tokenizer}")
        stage.tokenizer = str(tok)
    for j, src in enumerate(stage.sources or []):
        if src is not None:
            _check_source(src, f"{sp}.sources[{j}]", recipe_dir, seen_sources, problems)
    if stage.schedule is None:
        problems.add(f"{sp}.schedule", "required (at least max_lr)")
    else:
        sched = stage.schedule
        if sched.min_lr is not None and sched.max_lr is not None and sched.min_lr > sched.max_lr:
            problems.add(f"{sp}.schedule.min_lr", f"must be <= max_lr ({sched.max_lr:g})")
        if sched.warmup is not None and sched.warmup >= 1 and not float(sched.warmup).is_integer():
            problems.add(f"{sp}.schedule.warmup", "must be a fraction < 1 or a whole number of steps")
    earlier = [n for n in names[:i] if n is not None]
    if stage.replay is not None:
        _check_replay(stage.replay, i, names, learned + earlier, problems)
    if stage.selection is not None and stage.selection.reference is not None:
        ref = stage.selection.reference
        if ref not in earlier:
            resolved = _resolve(ref, recipe_dir)
            if not (resolved / "config.json").is_file():
                problems.add(f"{sp}.selection.reference",
                             f"{ref!r} is neither an earlier stage nor a Hugging Face model folder")
    if stage.expand is not None:
        exp = stage.expand
        if exp.method == "llama_pro" and exp.add_layers is None:
            problems.add(f"{sp}.expand.add_layers", "required for method llama_pro")
        if exp.method == "width" and exp.hidden_size is None:
            problems.add(f"{sp}.expand.hidden_size", "required for method width")
        if not stage.reset_optimizer:
            problems.add(f"{sp}.reset_optimizer", "must be true when the stage expands the model (the optimizer state has the old shapes)")
        _check_moe(exp, sp, problems)
    if stage.adapter is not None:
        _check_adapter(stage, sp, problems)
    check_stage_defences(stage, i, names, recipe, recipe_dir, _resolve, problems)


def _check_moe(exp: Expand, sp: str, problems: Problems) -> None:
    if exp.method != "moe":
        for key in ("experts", "add_experts", "aux_loss_coef"):
            if getattr(exp, key) is not None:
                problems.add(f"{sp}.expand.{key}", "only for method moe")
    elif (exp.experts is None) == (exp.add_experts is None):
        problems.add(f"{sp}.expand", "method moe needs exactly one of experts (upcycle) or add_experts (grow)")
    elif exp.experts is not None and exp.top_k > exp.experts:
        problems.add(f"{sp}.expand.top_k", f"must be <= experts ({exp.experts})")


def _check_adapter(stage: Stage, sp: str, problems: Problems) -> None:
    """The adapter's own keys here; the rest must be options of peft's LoraConfig."""
    adapter, ap = stage.adapter, f"{sp}.adapter"
    if adapter.get("type", "lora") != "lora":
        problems.add(f"{ap}.type", f"must be 'lora' (DoRA, rsLoRA: use_dora / use_rslora), got {adapter['type']!r}")
    for key, ok, want in (("r", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an integer > 0"),
                          ("alpha", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"),
                          ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
                          ("targets", lambda v: isinstance(v, (str, list)) and v, "a module name or a list of them")):
        if key in adapter and not ok(adapter[key]):
            problems.add(f"{ap}.{key}", f"must be {want}, got {adapter[key]!r}")
    if stage.expand is not None:
        problems.add(f"{ap}", "cannot be combined with expand in one stage (the adapter must apply to the previous export)")
    try:
        from peft import LoraConfig  # a heavy optional library: imported only when a recipe has an adapter
    except ImportError:
        problems.add(ap, "needs peft (pip install peft)")
        return
    options = {f.name for f in fields(LoraConfig) if f.init}
    for key in adapter:
        if key not in ("type", "r", "alpha", "dropout", "targets") and key not in options:
            hint = difflib.get_close_matches(str(key), sorted(options), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.add(f"{ap}.{key}", f"unknown key: neither r/alpha/dropout/targets nor a peft LoraConfig option{extra}")


def _check_replay(replay: Replay, i: int, names: list[str | None], earlier: list[str], problems: Problems) -> None:
    sp = f"stages[{i}].replay"
    if not earlier:
        problems.add(sp, "the first stage has no earlier stage to replay (list the base model's corpus under "
                         "`pretraining:` to replay it)")
    if replay.from_ is None:
        return
    if not replay.from_:
        problems.add(f"{sp}.from", "must name at least one earlier stage (leave it out to replay all)")
    for k, name in enumerate(replay.from_):
        if name in replay.from_[:k]:
            problems.add(f"{sp}.from[{k}]", f"stage {name!r} is named twice")
        elif name in earlier:
            continue
        elif name == PRETRAINING:
            problems.add(f"{sp}.from[{k}]", f"the recipe lists no `{PRETRAINING}:` sources to replay")
        elif name in names[i:]:
            problems.add(f"{sp}.from[{k}]", f"{name!r} is not an earlier stage (replay only looks back)")
        else:
            hint = difflib.get_close_matches(name, earlier, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.add(f"{sp}.from[{k}]", f"unknown stage {name!r}{extra}")


def _check_evaluation(ev: Evaluation, stage_names: list[str], recipe_dir: Path, problems: Problems) -> None:
    """Local task files exist (resolved like sources); batch_size and the stage map make sense.
    Whether the harness is installed and can load each task is `strata check`'s job
    (pipeline/evaluate/harness.py), not the recipe's."""
    for k, task in enumerate(ev.tasks or []):
        if task is not None and task.endswith((".yaml", ".yml")):
            resolved = _resolve(task, recipe_dir)
            if not resolved.is_file():
                problems.add(f"evaluation.tasks[{k}]", f"file or folder not found: {task}")
            ev.tasks[k] = str(resolved)
    size = ev.batch_size
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0) and not (
            isinstance(size, str) and (size == "auto" or size.startswith("auto:"))):
        problems.add("evaluation.batch_size", f"must be a whole number > 0 or auto, got {size!r}")
    if ev.limit is not None and ev.limit >= 1 and not float(ev.limit).is_integer():
        problems.add("evaluation.limit", f"must be a fraction < 1 or a whole number of examples, got {ev.limit:g}")
    for task, stage in (ev.stage or {}).items():
        if stage not in stage_names:
            hint = difflib.get_close_matches(str(stage), stage_names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.add(f"evaluation.stage.{task}", f"unknown stage {stage!r}{extra}")


def _check_source(src: Source, sp: str, recipe_dir: Path, seen: dict[str, str], problems: Problems) -> None:
    if src.name is not None:
        if src.name in seen:
            problems.add(f"{sp}.name", f"duplicate source name {src.name!r} (also {seen[src.name]})")
        seen.setdefault(src.name, sp)
        if "/" in src.name or src.name.startswith("."):
            problems.add(f"{sp}.name", f"must not contain '/' or start with '.': {src.name!r}")
    if src.path is not None:
        resolved = _resolve(src.path, recipe_dir)
        if not resolved.exists() and not getattr(problems, "prepared", False):
            problems.add(f"{sp}.path", f"file or folder not found: {src.path}")
        src.path = str(resolved)
    if src.template is not None and src.format is not None:
        problems.add(f"{sp}.format", "give template or format, not both")
    if src.template is not None:
        problem = _template_problem(src.template)
        if problem:
            problems.add(f"{sp}.template", problem)
    if (src.from_ is not None or src.to is not None) and src.date_field is None:
        problems.add(f"{sp}.date_field", "required when from/to slice the source by date")
    if src.from_ is not None and src.to is not None and src.from_ > src.to:
        problems.add(f"{sp}.to", f"must not be before from ({src.from_})")


def _template_problem(template: str) -> str | None:
    """The syntax error of a Jinja2 template, if any (rendering lives in pipeline/data/templates.py)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    try:
        SandboxedEnvironment().parse(template)
    except TemplateSyntaxError as e:
        return f"not a valid Jinja2 template (line {e.lineno}: {e.message})"
    return None


def parse_recipe(raw: Any, file: str = "<recipe>", recipe_dir: Path | None = None, prepared: bool = False) -> Recipe:
    """Build and validate a Recipe from an already-parsed YAML mapping. Raises RecipeError.

    `prepared`: the sources' files need not exist (a run folder's recipe: its shards are prepared)."""
    problems = Problems()
    problems.prepared = prepared
    recipe = load_dataclass(Recipe, raw, "", problems)
    if recipe is not BAD:
        _check(recipe, recipe_dir or Path.cwd(), problems)
    if problems:
        raise RecipeError(file, list(problems))
    recipe.file = file
    recipe.raw = raw
    return recipe


def load_recipe(path: str | Path, prepared: bool = False) -> Recipe:
    """Read, parse and validate a recipe file. Raises RecipeError with every problem found."""
    path = Path(path)
    raw = read_yaml(path)  # not found, not text, not YAML, a repeated key: one error naming the file
    return parse_recipe(raw, str(path), path.parent, prepared)


def recipe_schema() -> dict:
    schema = dataclass_schema(Recipe)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Strata data recipe"
    return schema
