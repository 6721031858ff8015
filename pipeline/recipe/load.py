"""Loading a recipe: the YAML file read (recipe/yaml_file.py), the typed dataclasses of
recipe/spec.py filled in (recipe/typed_yaml.py), then the cross-field checks below: names, files,
arithmetic, references between stages. Every problem is collected with its key path and reported
together; `parse_recipe` / `load_recipe` raise one RecipeError holding all of them.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pipeline.errors import RecipeError
from pipeline.files import model_folder_problem, name_problem
from pipeline.recipe.adapter_keys import (
    ADAPTER_TYPES,
    MERGEABLE,
    PROMPT_LEARNING,
    check_adapter,
    check_prompt_learning,
)
from pipeline.recipe.combinations import StageCheck, frozen_embeddings
from pipeline.recipe.forgetting import check_stage_defences
from pipeline.recipe.generated import check_generate
from pipeline.recipe.spec import (
    PRETRAINING,
    Evaluation,
    Expand,
    Model,
    Recipe,
    Replay,
    Schedule,
    Source,
    Stage,
)
from pipeline.recipe.typed_yaml import BAD, Problems, dataclass_schema, load_dataclass
from pipeline.recipe.yaml_file import read_yaml

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
    if (why := name_problem(recipe.name)) is not None:  # the default data dir is data/NAME
        problems.add("name", why)
    batch = recipe.batch
    if batch is not None and batch.micro and batch.global_ and batch.global_ % batch.micro:
        problems.add("batch.global", f"must be a multiple of batch.micro ({batch.micro}), got {batch.global_}")

    zero = recipe.deepspeed.zero_stage
    if zero not in (0, 1, 2, 3):
        problems.add("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {zero!r}")
    for key, instead in _COMPUTED_DS_KEYS.items():
        if key in recipe.deepspeed.config:
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
            _check_stage(stage, StageCheck(recipe, i, names, recipe_dir, _resolve, problems), seen_sources, learned)
            if stage.replay is not None and stage.replay.weights is not None:
                _check_replay_weights(recipe, i, problems)
    for j, src in enumerate(recipe.eval or []):  # eval sets share the source namespace (data folders)
        if src is not None:
            _check_source(src, f"eval[{j}]", recipe_dir, seen_sources, problems)
    for j, src in enumerate(recipe.pretraining or []):
        if src is not None:
            _check_source(src, f"pretraining[{j}]", recipe_dir, seen_sources, problems)
    if recipe.evaluation is not None:
        named = [s.name for s in stages if s is not None and isinstance(s.name, str)]
        _check_evaluation(recipe.evaluation, named, recipe_dir, problems, check_stage_map=bool(named))
    if not problems and any(s.tokenizer is not None for s in stages):
        _check_stage_tokenizers(recipe, problems)
    _check_dedup(recipe, problems)


def _check_dedup(recipe: Recipe, problems: Problems) -> None:
    """A source's `dedup:` refines data.dedup (the n-gram size and the scope live there); eval sets
    are never deduplicated (decontamination checks them instead)."""
    on = recipe.data is not None and recipe.data.dedup is not None
    paths = [(f"stages[{i}].sources[{j}]", src) for i, stage in enumerate(recipe.stages or []) if stage is not None
             for j, src in enumerate(stage.sources or [])]
    paths += [(f"pretraining[{j}]", src) for j, src in enumerate(recipe.pretraining or [])]
    for sp, src in paths:
        if src is not None and src.dedup is not None and not on:
            problems.add(f"{sp}.dedup", "needs data.dedup (where the n-gram size and the scope are set)")
    for j, src in enumerate(recipe.eval or []):
        if src is not None and src.dedup is not None:
            problems.add(f"eval[{j}].dedup", "eval sets are not deduplicated (they are checked for contamination)")


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
    replayed = recipe.replay_weight_names(i)  # the plan's rule (spec.py), so the two cannot disagree
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
        if (why := model_folder_problem(resolved)) is not None:
            problems.add("model.from_pretrained", why)
        model.from_pretrained = str(resolved)


def _check_stage(stage: Stage, check: StageCheck, seen_sources: dict[str, str], learned: list[str]) -> None:
    """Stage `check.index`'s own keys and its references to earlier stages (`learned`: what is
    replayable before stage 0); `seen_sources` collects source names across the recipe."""
    i, names, sp, problems = check.index, check.names, check.path, check.problems
    _check_stage_name(stage, check)
    if stage.sources is not None and not stage.sources:
        problems.add(f"{sp}.sources", "must list at least one source")
    if stage.tokenizer is not None:
        tok = _resolve(stage.tokenizer, check.recipe_dir)
        if not tok.exists():
            problems.add(f"{sp}.tokenizer", f"file or folder not found: {stage.tokenizer}")
        stage.tokenizer = str(tok)
    for j, src in enumerate(stage.sources or []):
        if src is not None:
            _check_source(src, f"{sp}.sources[{j}]", check.recipe_dir, seen_sources, problems)
    _check_schedule(stage.schedule, sp, problems)
    earlier = [n for n in names[:i] if n is not None]
    if stage.replay is not None:
        _check_replay(stage.replay, i, names, learned + earlier, problems)
        if stage.replay.generate is not None:
            check_generate(stage, check)
    if stage.selection is not None and stage.selection.reference is not None:
        _check_reference(stage.selection.reference, earlier, check)
    if stage.expand is not None:
        _check_expand(stage, sp, problems)
    if stage.adapter is not None:
        _check_adapter(stage, check, last=i == len(names) - 1)
    check_stage_defences(stage, check)


def _check_stage_name(stage: Stage, check: StageCheck) -> None:
    """A stage name is a folder name, not one of the reserved evaluation names, and unique."""
    i, names, path, problems = check.index, check.names, f"{check.path}.name", check.problems
    if (why := name_problem(stage.name)) is not None:
        problems.add(path, why)
    if stage.name == "init":  # eval.json and the report call the model before any stage "init"
        problems.add(path, "'init' is reserved for the model before the first stage")
    if stage.name == PRETRAINING:
        problems.add(path, f"{PRETRAINING!r} is reserved for the recipe's `pretraining:` sources")
    if stage.name is not None and stage.name in names[:i]:
        problems.add(path, f"duplicate stage name {stage.name!r} (also stages[{names.index(stage.name)}])")


def _check_schedule(sched: Schedule | None, sp: str, problems: Problems) -> None:
    if sched is None:
        problems.add(f"{sp}.schedule", "required (at least max_lr)")
        return
    if sched.min_lr is not None and sched.max_lr is not None and sched.min_lr > sched.max_lr:
        problems.add(f"{sp}.schedule.min_lr", f"must be <= max_lr ({sched.max_lr:g})")
    if sched.warmup is not None and sched.warmup >= 1 and not float(sched.warmup).is_integer():
        problems.add(f"{sp}.schedule.warmup", "must be a fraction < 1 or a whole number of steps")


def _check_reference(ref: str, earlier: list[str], check: StageCheck) -> None:
    """RHO-1's reference model: an earlier stage, or a Hugging Face model folder."""
    if ref in earlier:
        return
    path, resolved = f"{check.path}.selection.reference", _resolve(ref, check.recipe_dir)
    if not resolved.is_dir():
        check.problems.add(path, f"{ref!r} is neither an earlier stage nor a Hugging Face model folder")
    elif (why := model_folder_problem(resolved)) is not None:
        check.problems.add(path, why)


def _check_expand(stage: Stage, sp: str, problems: Problems) -> None:
    exp = stage.expand
    if exp.method == "llama_pro" and exp.add_layers is None:
        problems.add(f"{sp}.expand.add_layers", "required for method llama_pro")
    if exp.method == "width" and exp.hidden_size is None:
        problems.add(f"{sp}.expand.hidden_size", "required for method width")
    if not stage.reset_optimizer:
        problems.add(f"{sp}.reset_optimizer", "must be true when the stage expands the model (the optimizer state has the old shapes)")
    _check_moe(exp, sp, problems)


def _check_moe(exp: Expand, sp: str, problems: Problems) -> None:
    if exp.method != "moe":
        for key in ("experts", "add_experts", "aux_loss_coef"):
            if getattr(exp, key) is not None:
                problems.add(f"{sp}.expand.{key}", "only for method moe")
    elif (exp.experts is None) == (exp.add_experts is None):
        problems.add(f"{sp}.expand", "method moe needs exactly one of experts (upcycle) or add_experts (grow)")
    elif exp.experts is not None and exp.top_k > exp.experts:
        problems.add(f"{sp}.expand.top_k", f"must be <= experts ({exp.experts})")


def _check_adapter(stage: Stage, check: StageCheck, last: bool) -> None:
    """The adapter's own keys (recipe/adapter_keys.py), and what it cannot be combined with."""
    sp, problems, recipe = check.path, check.problems, check.recipe
    check_adapter(stage.adapter, f"{sp}.adapter", problems)
    kind = stage.adapter.get("type", "lora")
    if kind in PROMPT_LEARNING:
        pretrained = recipe.model.from_pretrained if recipe.model is not None else None
        model_dir = check.resolve(pretrained, check.recipe_dir) if pretrained else None
        check_prompt_learning(stage, f"{sp}.adapter", recipe, model_dir, problems)
    if not last and kind in ADAPTER_TYPES and kind not in MERGEABLE:
        problems.add(f"{sp}.adapter.type", f"{kind} cannot be merged into the weights, so the next stage would start "
                     "from the base model without it: make it the last stage, or use lora or ia3")
    if stage.expand is not None:
        problems.add(f"{sp}.adapter", "cannot be combined with expand in one stage (the adapter must apply to the previous export)")


def _check_replay(replay: Replay, i: int, names: list[str | None], earlier: list[str], problems: Problems) -> None:
    sp = f"stages[{i}].replay"
    if not earlier and replay.generate is None:
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


def evaluation_problems(ev: Evaluation) -> list[tuple[str, str]]:
    """(key, problem) of the harness settings `strata eval` may also set from its options."""
    out = []
    size = ev.batch_size
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0) and not (
            isinstance(size, str) and (size == "auto" or size.startswith("auto:"))):
        out.append(("batch_size", f"must be a whole number > 0 or auto, got {size!r}"))
    if ev.limit is not None and (ev.limit <= 0 or (ev.limit >= 1 and not float(ev.limit).is_integer())):
        out.append(("limit", f"must be a fraction < 1 or a whole number of examples, got {ev.limit:g}"))
    if ev.num_fewshot is not None and ev.num_fewshot < 0:
        out.append(("num_fewshot", f"must be >= 0, got {ev.num_fewshot}"))
    return out


def _check_evaluation(ev: Evaluation, stage_names: list[str], recipe_dir: Path, problems: Problems,
                      check_stage_map: bool = True) -> None:
    """Local task files exist (resolved like sources); batch_size and the stage map make sense.
    Whether the harness is installed and can load each task is `strata check`'s job
    (pipeline/evaluate/harness.py), not the recipe's."""
    for k, task in enumerate(ev.tasks or []):
        if task is not None and task.endswith((".yaml", ".yml")):
            resolved = _resolve(task, recipe_dir)
            if not resolved.is_file():
                problems.add(f"evaluation.tasks[{k}]", f"file or folder not found: {task}")
            ev.tasks[k] = str(resolved)
    for key, problem in evaluation_problems(ev):
        problems.add(f"evaluation.{key}", problem)
    for task, stage in (ev.stage or {}).items() if check_stage_map else ():  # (no stages: said already)
        if stage not in stage_names:
            hint = difflib.get_close_matches(str(stage), stage_names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.add(f"evaluation.stage.{task}", f"unknown stage {stage!r}{extra}")


def _check_source(src: Source, sp: str, recipe_dir: Path, seen: dict[str, str], problems: Problems) -> None:
    if src.name is not None:
        if src.name in seen:
            problems.add(f"{sp}.name", f"duplicate source name {src.name!r} (also {seen[src.name]})")
        seen.setdefault(src.name, sp)
        if (why := name_problem(src.name)) is not None:
            problems.add(f"{sp}.name", why)
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
