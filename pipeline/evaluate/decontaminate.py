"""Decontamination in a run: eval.json's "contamination" section, and dropping contaminated task items.

Invariant: the section is pipeline/data/contamination.py's, computed from the prepared data and
the items of the recipe's lm-eval tasks, and rewritten whenever the held-out evaluation writes
eval.json (the shares do not depend on the model). With `evaluation.decontaminate: drop`, the
tasks after a stage are scored without the items contaminated by the training data up to that
stage (their ids are listed in the section); the initial model is scored on every item.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.data.contamination import contamination
from pipeline.errors import StrataError
from pipeline.files import read_json, write_json_atomic
from pipeline.recipe.spec import Recipe

SECTION = "contamination"


def item_text(task, doc) -> str:
    """What an item shows a model: its prompt and its answer (the right choice of a multiple-choice item)."""
    text, target = task.doc_to_text(doc), task.doc_to_target(doc)
    if isinstance(target, int) and getattr(task, "OUTPUT_TYPE", "") == "multiple_choice":
        target = task.doc_to_choice(doc)[target]
    return f"{text} {target if isinstance(target, str) else ''}"


_ITEMS: dict[tuple, dict[str, list[str]]] = {}  # a run writes eval.json after every stage: load the tasks once


def recipe_task_items(recipe: Recipe) -> dict[str, list[str]]:
    """Item texts of each task of `evaluation.tasks` (empty when there is none or lm-eval is missing)."""
    from pipeline.evaluate.harness import harness_installed

    if not recipe.evaluation.tasks or not harness_installed():
        return {}
    key = tuple((t, Path(t).stat().st_mtime_ns if Path(t).is_file() else None) for t in recipe.evaluation.tasks)
    if key not in _ITEMS:
        _ITEMS[key] = _load_items(recipe)
    return _ITEMS[key]


def _load_items(recipe: Recipe) -> dict[str, list[str]]:
    from pipeline.evaluate.harness import offline_and_seeded, recipe_tasks, task_manager

    try:
        tasks = recipe_tasks(recipe)
    except StrataError:
        return {}  # strata check names the bad task entry
    out = {}
    with offline_and_seeded():
        for task in tasks:
            try:
                loaded = _local_task(task.file) if task.file is not None else None
                loaded = loaded or task_manager(tasks).load([task.name])["tasks"][task.name]
            except Exception:  # noqa: BLE001 (harness.task_problems reports why a task cannot load)
                continue
            out[task.name] = [item_text(loaded, doc) for doc in loaded.eval_docs]
    return out


def _local_task(file: Path):
    """A local task YAML built directly (seconds faster than a TaskManager, which indexes every task
    the harness ships); None when it needs the manager (`include:`, `!function`, a group)."""
    import yaml
    from lm_eval.api.task import ConfigurableTask

    from pipeline.evaluate.harness import _TolerantLoader

    config = yaml.load(file.read_text(), Loader=_TolerantLoader)  # noqa: S506 (a SafeLoader subclass)
    if not isinstance(config, dict) or "include" in config or "group" in config or None in config.values():
        return None
    try:
        return ConfigurableTask(config=config)
    except Exception:  # noqa: BLE001 (then the TaskManager's way)
        return None


def record_contamination(run_dir: Path, recipe: Recipe) -> dict:
    """Compute the section and write it into RUN_DIR/eval.json (keeping the other sections)."""
    section = contamination(recipe, recipe_task_items(recipe))
    path = Path(run_dir) / "eval.json"
    doc = read_json(path, "evaluation results", "delete it and run `strata eval`") or {"version": 1, "recipe": recipe.name}
    doc[SECTION] = section
    write_json_atomic(path, doc)
    return section


def dropped_items(run_dir: Path, recipe: Recipe, evaluation: str, task: str) -> list[int]:
    """Ids of the items of `task` left out of scoring after `evaluation` (a stage name, or init)."""
    if recipe.evaluation.decontaminate != "drop":
        return []
    doc = read_json(Path(run_dir) / "eval.json", "evaluation results", "delete it and run `strata eval`") or {}
    section = doc.get(SECTION) or record_contamination(run_dir, recipe)
    return section["sets"].get(task, {}).get("stages", {}).get(evaluation, {}).get("ids", [])


def task_samples(recipe: Recipe, run_dir: Path, evaluation: str, names: list[str]) -> dict[str, list[int]] | None:
    """lm-eval's `samples` (task -> item ids to score) leaving out the items contaminated by the
    training data up to `evaluation`, with `evaluation.limit` applied to what is left; None when
    nothing is dropped (the harness then applies the limit itself)."""
    drop = {name: set(dropped_items(run_dir, recipe, evaluation, name)) for name in names}
    if not any(drop.values()):
        return None
    doc = read_json(Path(run_dir) / "eval.json", "evaluation results", "delete it and run `strata eval`") or {}
    limit = recipe.evaluation.limit
    out = {}
    for name in names:
        count = doc[SECTION]["sets"][name]["items"]
        keep = [i for i in range(count) if i not in drop[name]]
        if limit is not None:
            keep = keep[:int(limit) if limit >= 1 else math.ceil(count * limit)]
        out[name] = keep
    return out
