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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import RecipeError
from pipeline.recipe.typed_yaml import BAD, Problems, dataclass_schema, load_dataclass, spec
from pipeline.recipe.yaml_file import read_yaml

# --------------------------------------------------------------------------------------------
# The recipe.


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
    method: Literal["llama_pro", "width"] = spec("llama_pro", help="Depth (LLaMA-Pro identity blocks) or width expansion.")
    add_layers: int | None = spec(None, gt=0, help="Blocks to insert (llama_pro).")
    freeze_old: bool = spec(True, help="Train only the new blocks (llama_pro).")
    hidden_size: int | None = spec(None, gt=0, help="New width (width).")
    intermediate_size: int | None = spec(None, gt=0, help="New MLP width (width).")
    noise: float = spec(0.0, ge=0, help="Width: zero-sum jitter of the split outgoing weights, so copied units can diverge (the function is still preserved).")


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
        """Every source to prepare: the stages' sources, then the `eval:` sets."""
        return [src for stage in self.stages for src in stage.sources] + list(self.eval)

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
        return list(replay.from_) if replay.from_ is not None else [s.name for s in self.stages[:index]]

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
    for i, stage in enumerate(stages):
        if stage is not None:
            _check_stage(stage, i, names, recipe_dir, seen_sources, problems)
            if stage.replay is not None and stage.replay.weights is not None:
                _check_replay_weights(recipe, i, problems)
    for j, src in enumerate(recipe.eval or []):  # eval sets share the source namespace (data folders)
        if src is not None:
            _check_source(src, f"eval[{j}]", recipe_dir, seen_sources, problems)
    if not problems and any(s.tokenizer is not None for s in stages):
        _check_stage_tokenizers(recipe, problems)


def _check_stage_tokenizers(recipe: Recipe, problems: Problems) -> None:
    """What the recipe alone can say about stage tokenizers; pipeline/data/tokenizer.py's
    `check_tokenizers` then reads the files (each must extend the one before it)."""
    before = recipe.tokenizer
    for i, stage in enumerate(recipe.stages):
        if stage.tokenizer is None or stage.tokenizer == before:
            continue
        exp = stage.expand
        if exp is not None and exp.method == "llama_pro" and exp.freeze_old:
            # freeze_old freezes the embeddings, so the new pieces' rows would never train
            problems.add(f"stages[{i}].expand.freeze_old", "must be false in a stage that adds tokenizer pieces "
                         "(the frozen embeddings would keep the new rows at their initial mean)")
        before = stage.tokenizer


def _check_replay_weights(recipe: Recipe, i: int, problems: Problems) -> None:
    replay = recipe.stages[i].replay
    from_ = replay.from_ if replay.from_ is not None else [s.name for s in recipe.stages[:i] if s is not None]
    replayed = [src.name for st in recipe.stages[:i] if st is not None and st.name in from_
                for src in (st.sources or []) if src is not None]
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
                 problems: Problems) -> None:
    sp = f"stages[{i}]"
    if stage.name == "init":  # eval.json and the report call the model before any stage "init"
        problems.add(f"{sp}.name", "'init' is reserved for the model before the first stage")
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
        _check_replay(stage.replay, i, names, earlier, problems)
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


def _check_replay(replay: Replay, i: int, names: list[str | None], earlier: list[str], problems: Problems) -> None:
    sp = f"stages[{i}].replay"
    if i == 0:
        problems.add(sp, "the first stage has no earlier stage to replay")
    if replay.from_ is None:
        return
    if not replay.from_:
        problems.add(f"{sp}.from", "must name at least one earlier stage (leave it out to replay all)")
    for k, name in enumerate(replay.from_):
        if name in replay.from_[:k]:
            problems.add(f"{sp}.from[{k}]", f"stage {name!r} is named twice")
        elif name in earlier:
            continue
        elif name in names[i:]:
            problems.add(f"{sp}.from[{k}]", f"{name!r} is not an earlier stage (replay only looks back)")
        else:
            hint = difflib.get_close_matches(name, earlier, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.add(f"{sp}.from[{k}]", f"unknown stage {name!r}{extra}")


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
    if (src.from_ is not None or src.to is not None) and src.date_field is None:
        problems.add(f"{sp}.date_field", "required when from/to slice the source by date")
    if src.from_ is not None and src.to is not None and src.from_ > src.to:
        problems.add(f"{sp}.to", f"must not be before from ({src.from_})")


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
