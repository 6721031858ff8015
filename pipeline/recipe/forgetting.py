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
from typing import Any, Literal

from pipeline.files import model_folder_problem
from pipeline.recipe.combinations import StageCheck, new_tokenizer, reshaped_between, same_vocabulary
from pipeline.recipe.typed_yaml import spec

# regularize.weight when the recipe gives none: what benchmarks/forgetting.py found to work
# (docs/forgetting.md, "Which defence forgets least"); the two differ by 10^6 because EWC's Fisher is ~1e-6 per parameter there.
REGULARIZE_WEIGHT = {"l2": 0.01, "ewc": 1.0e4}


@dataclass(kw_only=True)
class Features:
    weight: float = spec(1.0, ge=0, help="w_f: weight of the hidden-state term in the loss.")
    layers: list[int] | None = spec(None, help="Decoder blocks whose outputs are compared (0-based; negative from the last); default every block.")
    loss: Literal["mse", "cosine"] = spec("mse", help="mse: mean over the width of (h_student - h_teacher)^2; cosine: 1 - cos(h_student, h_teacher); averaged over the tokens the KL uses and the layers.")


@dataclass(kw_only=True)
class Distill:
    teacher: str = spec("previous", help="previous (the model as the stage started), an earlier stage's name, or a local HF folder.")
    weight: float = spec(1.0, ge=0, help="w in CE + w * T^2 * KL(teacher || student).")
    temperature: float = spec(2.0, gt=0, help="T: both distributions are softmax(logits / T).")
    on: Literal["all", "replay"] = spec("all", help="Distill on every token, or only on the samples of replayed sources.")
    features: Features | None = spec(None, help="Feature regularisation: also pull the student's hidden states towards the teacher's on the same tokens (+ w_f * distance).")


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


def _earlier_or_folder(check: StageCheck, value: str, path: str, folder_ok: bool = True) -> None:
    """`value` must be `previous`, an earlier stage, or (if folder_ok) a local Hugging Face folder."""
    i, names, problems = check.index, check.names, check.problems
    if value == "previous" or value in names[:i]:
        return
    if value in names[i:]:
        what = "itself" if names[i] == value else "a later stage"
        problems.add(path, f"{value!r} is {what}; name an earlier stage or previous")
        return
    folder = check.resolve(value, check.recipe_dir)
    if folder_ok and folder.is_dir():  # a folder: it must be a model
        if (why := model_folder_problem(folder)) is not None:
            problems.add(path, why)
        return
    hint = difflib.get_close_matches(value, [n for n in names[:i] if n], n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    kind = "an earlier stage, previous, nor a Hugging Face model folder" if folder_ok else "an earlier stage nor previous"
    problems.add(path, f"{value!r} is neither {kind}{extra}")


def check_stage_defences(stage: Any, check: StageCheck) -> None:
    """Cross-field checks of one stage's distill / regularize / merge blocks (and what they refuse
    to combine with: only what cannot be right, each with its reason)."""
    sp, i, recipe, problems = check.path, check.index, check.recipe, check.problems
    d, r = stage.distill, stage.regularize
    if d is not None:
        if d.teacher is not None:
            _earlier_or_folder(check, d.teacher, f"{sp}.distill.teacher")
            same_vocabulary(check, d.teacher, f"{sp}.distill.teacher", "teacher")
        if d.on == "replay" and (stage.replay is None or not stage.replay.ratio):
            problems.add(f"{sp}.distill.on", "is replay, but the stage replays nothing (add replay: {ratio: ...} or use on: all)")
        if new_tokenizer(recipe, i):
            problems.add(f"{sp}.distill", "cannot be used in a stage that changes the tokenizer (teacher and student "
                         "would predict over different vocabularies)")
        if d.features is not None:
            _check_features(d, check)
    if r is not None and r.method == "ewc" and i == 0 and not recipe.pretraining:
        problems.add(f"{sp}.regularize.method", "ewc needs earlier stages' data for its Fisher; the first stage has none "
                     "(list the base model's corpus under `pretraining:`)")
    if r is not None and stage.adapter is not None:
        problems.add(f"{sp}.regularize", "cannot be combined with adapter: the penalty would pull the LoRA factors "
                     "towards their initialisation (B = 0, A random; EWC's Fisher of A is 0 there), not the model's "
                     "weights towards the stage's start")
    if stage.selection is not None and stage.selection.reference is not None:
        same_vocabulary(check, stage.selection.reference, f"{sp}.selection.reference", "reference", upto=i)
    if stage.merge is not None:
        _check_merge(stage, check)


def _check_merge(stage: Any, check: StageCheck) -> None:
    sp, i, recipe, names, problems, m = check.path, check.index, check.recipe, check.names, check.problems, stage.merge
    if m.with_ is not None:
        _earlier_or_folder(check, m.with_, f"{sp}.merge.with", folder_ok=False)
        grown = reshaped_between(recipe, names.index(m.with_), i - 1) if m.with_ in names[:i] else None
        if grown is not None:
            problems.add(f"{sp}.merge.with", f"stage {m.with_!r} has another shape than this stage's model "
                         f"(stage {grown!r} expands the model or grows its vocabulary); merge with a later stage")
    if m.with_ == "previous" and i == 0 and recipe.model is not None and recipe.model.from_pretrained is None:
        problems.add(f"{sp}.merge.with", "previous of the first stage is a random initial model; merge with "
                     "it only when model.from_pretrained is set")
    if recipe.zero_stage == 3:
        problems.add(f"{sp}.merge", "is not supported under ZeRO-3 yet (the merged weights are loaded into "
                     "the whole module): use deepspeed.zero_stage 0, 1 or 2")
    following = recipe.stages[i + 1] if i + 1 < len(recipe.stages or []) else None
    if following is not None and following.reset_optimizer is False:
        problems.add(f"{sp}.merge", "the next stage keeps the optimizer state (reset_optimizer: false), whose "
                     "master weights would be the unmerged ones")
    if stage.expand is not None or new_tokenizer(recipe, i):
        problems.add(f"{sp}.merge", "cannot merge across a change of shape (this stage expands the model or "
                     "grows its vocabulary)")


def _check_features(d: Distill, check: StageCheck) -> None:
    """The teacher's blocks must line up with the student's: no reshaping since the teacher."""
    i, names, recipe, problems = check.index, check.names, check.recipe, check.problems
    fp = f"stages[{i}].distill.features"
    grown = recipe.stages[i].name if recipe.stages[i].expand is not None else None
    if grown is None and d.teacher in names[:i]:  # an earlier stage: every stage after it counts
        grown = reshaped_between(recipe, names.index(d.teacher), i - 1)
    if grown is not None:
        problems.add(fp, f"cannot compare hidden states across stage {grown!r}, which reshapes the model (expand or a "
                     "new tokenizer): the student's blocks no longer line up with the teacher's")
    num_layers = recipe.model.init.num_layers if recipe.model is not None and recipe.model.init is not None else None
    for k, layer in enumerate(d.features.layers or []):
        if num_layers is not None and not -num_layers <= layer < num_layers:
            problems.add(f"{fp}.layers[{k}]", f"the model has {num_layers} blocks (0..{num_layers - 1}), got {layer}")


def describe_defences(stage: Any) -> list[str]:
    """One line per defence of the stage, for `strata check`'s plan."""
    lines = []
    if stage.distill is not None:
        d = stage.distill
        lines.append(f"distill: teacher {d.teacher}, loss CE + {d.weight:g} * {d.temperature:g}^2 * KL "
                     f"on {'replayed samples' if d.on == 'replay' else 'every token'}")
        if d.features is not None:
            f = d.features
            lines.append(f"  + {f.weight:g} * {f.loss} of the hidden states of blocks "
                         f"{'all' if f.layers is None else f.layers} (student vs teacher, same tokens)")
    if stage.regularize is not None:
        r = stage.regularize
        what = "(theta - theta*)^2" if r.method == "l2" else f"F (theta - theta*)^2, Fisher on {r.fisher_tokens:,} earlier tokens"
        lines.append(f"regularize: {r.method}, penalty {r.weight:g}/2 * sum {what}")
    if stage.merge is not None:
        m = stage.merge
        lines.append(f"merge: {m.method} with {m.with_} at the stage end, weight {m.weight:g} on the trained model")
    return lines
