"""Recipe keys of the defences against forgetting beyond replay: `distill`, `regularize`, `merge`.

The dataclasses are stage keys (spec.py's `Stage` holds them); `check_stage_defences` is their
part of the recipe's cross-field validation: it reports every nonsensical combination by key path
(a teacher that is not an earlier stage, `on: replay` without replay, a merge with itself, ...).
The training side lives in pipeline/train/objectives.py (distillation, L2, EWC) and
pipeline/model/merge.py (merging).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.recipe.combinations import new_tokenizer, reshaped_between, same_vocabulary
from pipeline.recipe.typed_yaml import Problems, spec

# regularize.weight when the recipe gives none: what benchmarks/forgetting.py found to work
# (docs/forgetting.md, "Which defence forgets least"); the two differ by 10^6 because EWC's Fisher is ~1e-6 per parameter there.
REGULARIZE_WEIGHT = {"l2": 0.01, "ewc": 1.0e4}


@dataclass(kw_only=True)
class Distill:
    teacher: str = spec("previous", help="previous (the model as the stage started), an earlier stage's name, or a local HF folder.")
    weight: float = spec(1.0, ge=0, help="w in CE + w * T^2 * KL(teacher || student).")
    temperature: float = spec(2.0, gt=0, help="T: both distributions are softmax(logits / T).")
    on: Literal["all", "replay"] = spec("all", help="Distill on every token, or only on the samples of replayed sources.")


@dataclass(kw_only=True)
class Regularize:
    method: Literal["l2", "ewc"] = spec(help="l2: w/2 * sum (theta - theta*)^2; ewc: w/2 * sum F (theta - theta*)^2.")
    weight: float | None = spec(None, ge=0, help="w: strength of the pull towards the weights the stage started "
                                "from; default 0.01 for l2, 1e4 for ewc (the scale of F depends on the model).")
    fisher_tokens: int = spec(1_000_000, gt=0, help="ewc: tokens of the earlier stages' data (in the first stage: of the `pretraining:` sources) the diagonal Fisher is estimated on.")

    def __post_init__(self) -> None:
        if self.weight is None:
            self.weight = REGULARIZE_WEIGHT[self.method]


@dataclass(kw_only=True)
class Merge:
    method: Literal["linear", "slerp", "ties"] = spec("linear", help="How the trained weights are merged with the earlier model.")
    weight: float = spec(0.5, ge=0, le=1, help="Share of the trained model: linear is (1 - w) * earlier + w * trained.")
    with_: str = spec("previous", key="with", help="previous (the model the stage started from) or an earlier stage's name.")


def _earlier_or_folder(value: str, path: str, i: int, names: list, recipe_dir: Path, resolve: Any,
                       problems: Problems, folder_ok: bool = True) -> None:
    """`value` must be `previous`, an earlier stage, or (if folder_ok) a local Hugging Face folder."""
    if value == "previous" or value in names[:i]:
        return
    if value in names[i:]:
        what = "itself" if names[i] == value else "a later stage"
        problems.add(path, f"{value!r} is {what}; name an earlier stage or previous")
        return
    if folder_ok and (resolve(value, recipe_dir) / "config.json").is_file():
        return
    hint = difflib.get_close_matches(value, [n for n in names[:i] if n], n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    kind = "an earlier stage, previous, nor a Hugging Face model folder" if folder_ok else "an earlier stage nor previous"
    problems.add(path, f"{value!r} is neither {kind}{extra}")


def check_stage_defences(stage: Any, i: int, names: list, recipe: Any, recipe_dir: Path, resolve: Any,
                         problems: Problems) -> None:
    """Cross-field checks of one stage's distill / regularize / merge blocks."""
    sp = f"stages[{i}]"
    d, r, m = stage.distill, stage.regularize, stage.merge
    if d is not None:
        if d.teacher is not None:
            _earlier_or_folder(d.teacher, f"{sp}.distill.teacher", i, names, recipe_dir, resolve, problems)
            same_vocabulary(d.teacher, f"{sp}.distill.teacher", "teacher", i, names, recipe, problems)
        if d.on == "replay" and (stage.replay is None or not stage.replay.ratio):
            problems.add(f"{sp}.distill.on", "is replay, but the stage replays nothing (add replay: {ratio: ...} or use on: all)")
        if new_tokenizer(recipe, i):
            problems.add(f"{sp}.distill", "cannot be used in a stage that changes the tokenizer (teacher and student "
                         "would predict over different vocabularies)")
    if r is not None and r.method == "ewc" and i == 0 and not recipe.pretraining:
        problems.add(f"{sp}.regularize.method", "ewc needs earlier stages' data for its Fisher; the first stage has none "
                     "(list the base model's corpus under `pretraining:`)")
    if r is not None and stage.adapter is not None:
        problems.add(f"{sp}.regularize", "cannot be combined with adapter: the penalty would pull the LoRA factors "
                     "towards their initialisation (B = 0, A random; EWC's Fisher of A is 0 there), not the model's "
                     "weights towards the stage's start")
    if stage.selection is not None and stage.selection.reference is not None:
        same_vocabulary(stage.selection.reference, f"{sp}.selection.reference", "reference", i, names, recipe,
                         problems, upto=i)
    if (d is not None or r is not None) and stage.selection is not None:
        problems.add(f"{sp}.selection", "cannot be combined with distill or regularize yet (RHO-1 runs its own step)")
    if r is not None and int(recipe.deepspeed.get("zero_stage", 0) or 0) == 3:
        problems.add(f"{sp}.regularize", "is not supported under ZeRO-3 (the penalty needs every parameter whole on "
                     "each rank; ZeRO-3 partitions them): use deepspeed.zero_stage 0, 1 or 2")
    if m is not None:
        if m.with_ is not None:
            _earlier_or_folder(m.with_, f"{sp}.merge.with", i, names, recipe_dir, resolve, problems, folder_ok=False)
            grown = reshaped_between(recipe, names.index(m.with_), i - 1) if m.with_ in names[:i] else None
            if grown is not None:
                problems.add(f"{sp}.merge.with", f"stage {m.with_!r} has another shape than this stage's model "
                             f"(stage {grown!r} expands the model or grows its vocabulary); merge with a later stage")
        if m.with_ == "previous" and i == 0 and recipe.model is not None and recipe.model.from_pretrained is None:
            problems.add(f"{sp}.merge.with", "previous of the first stage is a random initial model; merge with "
                         "it only when model.from_pretrained is set")
        if int(recipe.deepspeed.get("zero_stage", 0) or 0) == 3:
            problems.add(f"{sp}.merge", "is not supported under ZeRO-3 yet (the merged weights are loaded into "
                         "the whole module): use deepspeed.zero_stage 0, 1 or 2")
        following = recipe.stages[i + 1] if i + 1 < len(recipe.stages or []) else None
        if following is not None and following.reset_optimizer is False:
            problems.add(f"{sp}.merge", "the next stage keeps the optimizer state (reset_optimizer: false), whose "
                         "master weights would be the unmerged ones")
        if stage.expand is not None or new_tokenizer(recipe, i):
            problems.add(f"{sp}.merge", "cannot merge across a change of shape (this stage expands the model or "
                         "grows its vocabulary)")


def describe_defences(stage: Any) -> list[str]:
    """One line per defence of the stage, for `strata check`'s plan."""
    lines = []
    if stage.distill is not None:
        d = stage.distill
        lines.append(f"distill: teacher {d.teacher}, loss CE + {d.weight:g} * {d.temperature:g}^2 * KL "
                     f"on {'replayed samples' if d.on == 'replay' else 'every token'}")
    if stage.regularize is not None:
        r = stage.regularize
        what = "(theta - theta*)^2" if r.method == "l2" else f"F (theta - theta*)^2, Fisher on {r.fisher_tokens:,} earlier tokens"
        lines.append(f"regularize: {r.method}, penalty {r.weight:g}/2 * sum {what}")
    if stage.merge is not None:
        m = stage.merge
        lines.append(f"merge: {m.method} with {m.with_} at the stage end, weight {m.weight:g} on the trained model")
    return lines
