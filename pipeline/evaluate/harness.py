"""Downstream tasks after every stage, with lm-evaluation-harness (the `evaluation:` block).

What runs. Every task of `evaluation.tasks` -- a harness task name (`hellaswag`) or a local task
YAML in lm-eval's own format (`dataset_path: json` with local `data_files`) -- is run with
`lm_eval.simple_evaluate` on the initial model and on the model after every stage, through lm-eval's
`HFLM` wrapper and a `TaskManager` whose include_path holds the local YAMLs' folders. Strata does
not score anything itself: the numbers are lm-eval's, the same as `lm_eval --model hf
--model_args pretrained=RUN_DIR/stages/NN-NAME/hf,max_length=SEQ_LEN --include_path ...` prints for
that export (scored at the recipe's `seq_len`; `harness_options` says why, and why no batch-size
probe runs on a CPU).
Nothing is downloaded: the Hugging Face offline switches are set for the call, so a hub task whose
data is not in the local cache fails (and `strata check` says so before training).

Which model. After a stage in one process, the trainer's own model object (it equals the export
just written); under torchrun, rank 0 loads the stage's export and the other ranks wait (the
harness runs in one process: its data parallelism needs `accelerate launch`). For `strata eval`
and the initial model, the model is loaded like the held-out evaluation loads it. lm-eval seeds
Python's, NumPy's and torch's generators; Strata restores them afterwards, so training after an
evaluation draws the same random numbers as without one.

Results go to the "tasks" section of RUN_DIR/eval.json (see `TaskResults`): per evaluation ("init",
then each stage), task and metric, the value and its standard error, with a fingerprint of what
was run (task file, num_fewshot, limit) so that results present are never recomputed. The
continual-learning metrics (pipeline/evaluate/metrics.py) are computed per metric over the tasks;
a task belongs to no stage (and enters none of them) unless `evaluation.stage` maps it to one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from pipeline.distributed import log
from pipeline.errors import RecipeError, StrataError
from pipeline.evaluate.heldout import EVAL_JSON, FIX, INIT, WHAT, RunEvaluation
from pipeline.evaluate.metrics import cl_metrics
from pipeline.files import read_json, update_json_locked
from pipeline.recipe.spec import Recipe
from pipeline.train.run_folder import export_dir

INSTALL = "pip install 'strata-cpt[harness]' (or pip install lm-eval)"
SECTION = "tasks"  # the section of eval.json this module owns
LOG = log(__name__)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def harness_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


@dataclass(frozen=True)
class Task:
    name: str  # the harness's name (a local YAML's `task:`)
    file: Path | None  # the local task YAML, if the task is one
    stage: int | None  # the stage whose domain it measures (`evaluation.stage`), else None


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval YAMLs, whose `!function` tags name Python code, without running anything."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_name_of(file: Path) -> str:
    """The `task:` (or `group:`) a local task YAML declares; a StrataError if it has none."""
    try:
        doc = yaml.load(file.read_text(), Loader=_TolerantLoader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, yaml.YAMLError) as e:
        raise StrataError(f"{file}: not a readable task YAML ({str(e).splitlines()[0]})") from None
    name = (doc or {}).get("task") or (doc or {}).get("group") if isinstance(doc, dict) else None
    if not isinstance(name, str):
        raise StrataError(f"{file}: a task YAML needs a `task:` name (lm-eval's format)")
    return name


def recipe_tasks(recipe: Recipe, entries: list[str] | None = None) -> list[Task]:
    """The tasks of the recipe (or `entries`, e.g. from `strata eval --tasks`), in order."""
    out = []
    for entry in recipe.evaluation.tasks if entries is None else entries:
        file = Path(entry) if entry.endswith((".yaml", ".yml")) else None
        if file is not None and not file.is_file():
            raise StrataError(f"task file not found: {entry}")
        name = task_name_of(file) if file else entry
        stage = recipe.evaluation.stage.get(name)
        out.append(Task(name, file, recipe.stage_index(stage) if stage is not None else None))
    return out


@contextlib.contextmanager
def offline_and_seeded():
    """Hugging Face offline for the call; Python/NumPy/torch RNG states as they were afterwards."""
    import numpy as np

    saved_env = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        import datasets.config  # read at import time: set it too when datasets was imported before

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def quiet_harness():
    """lm-eval's progress bars and notes ("Overwriting default num_fewshot ...", "Passed an
    already-initialized model ...") off for the call: Strata prints one `tasks ...` line per
    evaluation instead. Its warnings about real problems (errors) still show.

    The bars: tqdm reads TQDM_DISABLE only when it is imported (long before, in a training run), so
    every tqdm made during the call (lm-eval's, datasets') is built with disable=True instead. Git:
    lm-eval records `git describe` of the working directory, which prints `fatal: not a git
    repository` outside one; Strata does not use that hash, so it is not asked for."""
    import logging

    import lm_eval.evaluator
    from tqdm import std

    loggers = [logging.getLogger(name) for name in ("lm-eval", "lm_eval")]
    levels = [lg.level for lg in loggers]
    tqdm_init, git_hash = std.tqdm.__init__, lm_eval.evaluator.get_git_commit_hash

    def silent_init(self: Any, *args: Any, **kwargs: Any) -> None:
        tqdm_init(self, *args, **{**kwargs, "disable": True})

    std.tqdm.__init__ = silent_init
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        std.tqdm.__init__, lm_eval.evaluator.get_git_commit_hash = tqdm_init, git_hash


def task_manager(tasks: list[Task]) -> Any:
    """lm-eval's TaskManager with the local tasks' folders on its include_path. Indexing every task
    the harness ships takes seconds (half a minute on a busy machine), so it is done only when a
    task is named rather than given as a file, and once per set of folders and process."""
    folders = tuple(sorted({str(t.file.resolve().parent) for t in tasks if t.file is not None}))
    return _task_manager(folders, any(t.file is None for t in tasks) or not folders)


@functools.lru_cache(maxsize=4)
def _task_manager(folders: tuple[str, ...], shipped: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders) or None, include_defaults=shipped)


def unknown_metrics(task: Task) -> list[str]:
    """The metrics of a local task's `metric_list` that lm-eval has no function for (unless the task
    computes its own, `process_results`, or asks HF Evaluate, `hf_evaluate: true`). lm-eval would
    only log them, try to download them, and then leave them out of the results without a word."""
    if task.file is None:
        return []
    import lm_eval.api.metrics  # noqa: F401 (fills the registry)
    from lm_eval.api.registry import metric_registry

    doc = yaml.load(task.file.read_text(), Loader=_TolerantLoader)  # noqa: S506 (read once already by task_name_of)
    if not isinstance(doc, dict) or "process_results" in doc or not isinstance(doc.get("metric_list"), list):
        return []
    names = [m.get("metric") for m in doc["metric_list"] if isinstance(m, dict) and not m.get("hf_evaluate")]
    return [f"{task.file}: unknown metric {name!r} in metric_list of task {task.name!r} (lm-eval has no such metric)"
            for name in names if isinstance(name, str) and name not in metric_registry]


def task_problems(recipe: Recipe, stage_keys: bool = True) -> list[str]:
    """Why the recipe's tasks cannot run here, one line each naming the task (`strata check`);
    with `stage_keys`, also every `evaluation.stage` key that names none of the tasks."""
    ev = recipe.evaluation
    if not ev.tasks:
        return []
    if not harness_installed():
        return [f"evaluation.tasks: names {len(ev.tasks)} task(s) but lm-evaluation-harness is not installed: {INSTALL}"]
    problems, tasks = [], {}
    for k, entry in enumerate(ev.tasks):
        try:
            tasks[k] = recipe_tasks(recipe, [entry])[0]
        except StrataError as e:
            problems.append(f"evaluation.tasks[{k}]: {e}")
    loadable = {}
    for k, task in tasks.items():
        unknown = unknown_metrics(task)
        problems += [f"evaluation.tasks[{k}]: {problem}" for problem in unknown]
        if not unknown:  # (loading the others would try to download the metric)
            loadable[k] = task
    with offline_and_seeded():
        manager = task_manager(list(loadable.values())) if loadable else None
        for k, task in loadable.items():
            try:
                manager.load([task.name])  # builds the task: reads its dataset
            except Exception as e:  # noqa: BLE001 (lm-eval and datasets raise many kinds; each is this task's problem)
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                problems.append(f"evaluation.tasks[{k}]: task {task.name!r} cannot be loaded (offline): {reason[:300]}")
    names = {t.name for t in tasks.values()}
    if stage_keys:
        problems += [f"evaluation.stage.{name}: not one of the tasks" for name in ev.stage if name not in names]
    return problems


def refuse_unloadable_tasks(recipe: Recipe, stage_keys: bool = True) -> None:
    """RecipeError listing every task of the recipe that cannot run here."""
    problems = task_problems(recipe, stage_keys)
    if problems:
        raise RecipeError(recipe.file, problems)


def run_tasks(model: torch.nn.Module, tokenizer: Any, tasks: list[Task], recipe: Recipe,
              samples: dict[str, list[int]] | None = None) -> dict[str, dict]:
    """lm-eval's results for `model`: {task: {"metrics": {metric: {"value", "stderr", "higher_is_better"}},
    "samples"}}. `tokenizer` is a transformers tokenizer; `samples` (task -> item ids) replaces the limit."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    ev = recipe.evaluation
    limit = int(ev.limit) if ev.limit is not None and ev.limit >= 1 else ev.limit
    limit = None if samples is not None else limit
    was_training = model.training
    with offline_and_seeded(), quiet_harness():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, **harness_options(recipe, next(model.parameters()).device))
        out = lm_eval.simple_evaluate(model=lm, tasks=[t.name for t in tasks], num_fewshot=ev.num_fewshot,
                                      limit=limit, samples=samples, task_manager=task_manager(tasks),
                                      log_samples=False)
    model.train(was_training)
    results = {}
    for task in tasks:
        raw = out["results"].get(task.name, {})
        higher = out.get("higher_is_better", {}).get(task.name, {})
        metrics = {}
        for key, value in raw.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            stderr = raw.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else key
            metrics[name] = {"value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                             "higher_is_better": bool(higher.get(metric, True))}
        samples = out.get("n-samples", {}).get(task.name, {}).get("effective")
        results[task.name] = {"metrics": metrics, "samples": samples}
    return results


def harness_options(recipe: Recipe, device: torch.device) -> dict[str, Any]:
    """HFLM's `max_length` and `batch_size` for the recipe's model on `device`.

    Requests are scored at the recipe's `seq_len`, the context the model trains at, not the
    model's `max_position_embeddings` (2,048 to 131,072 for pretrained checkpoints): longer
    contexts are cut from the left, as lm-eval does at any max_length. `batch_size: auto` on a CPU
    is the training micro batch: lm-eval's probe (five forward passes at each batch size from 64
    down, at the longest request) costs more than scoring a small task there and finds no memory
    limit to respect. On an accelerator `auto` stays lm-eval's probe, now at `seq_len`.
    """
    batch = recipe.evaluation.batch_size
    if isinstance(batch, str) and batch.startswith("auto") and device.type == "cpu":
        batch = recipe.batch.micro
    return {"batch_size": batch, "max_length": recipe.seq_len}


def hf_tokenizer(folder: Path | None, recipe: Recipe) -> Any:
    """The transformers tokenizer of an export folder, or of the recipe's tokenizer (initial model)."""
    from transformers import AutoTokenizer

    if folder is not None:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    from pipeline.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        load_tokenizer(recipe.tokenizer).save_to(Path(tmp))
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


# ------------------------------------------------------------------------------------------------
# eval.json's "tasks" section


def fingerprint(task: Task, recipe: Recipe) -> str:
    """What decides a task's numbers besides the model: its file, num_fewshot, limit."""
    text = task.file.read_text() if task.file is not None else ""
    fields = [task.name, text, recipe.evaluation.num_fewshot, recipe.evaluation.limit]
    if recipe.evaluation.decontaminate == "drop":  # absent otherwise: older fingerprints stay valid
        fields.append("drop contaminated")
    blob = json.dumps(fields)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TaskResults:
    """The "tasks" section of RUN_DIR/eval.json (the held-out sections are heldout.EvalFile's):

    {"tasks": [{"name", "file", "stage", "stage_index"}], "evaluations": [in run order],
     "results": {evaluation: {task: {"metrics": {metric: {"value", "stderr", "higher_is_better"}},
                                     "samples", "fingerprint"}}},
     "metrics": {metric: {"AA" | "AIA" | "FGT" | "BWT" | "FWD": {stage: value}}}}
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / EVAL_JSON
        self._take(read_json(self.path, WHAT, FIX) or {})
        self.fresh: dict[str, dict[str, dict]] = {}  # evaluation -> task -> results not yet written

    def _take(self, doc: dict) -> None:
        section = doc.get(SECTION) or {}
        self.results: dict[str, dict[str, dict]] = section.get("results", {})
        self.known: list[dict] = section.get("tasks", [])

    def has(self, evaluation: str, task: str, print_: str) -> bool:
        return self.results.get(evaluation, {}).get(task, {}).get("fingerprint") == print_

    def add(self, evaluation: str, results: dict[str, dict]) -> None:
        """Results this process computed: in memory now, merged into eval.json by the next write."""
        self.results.setdefault(evaluation, {}).update(results)
        self.fresh.setdefault(evaluation, {}).update(results)

    def write(self, recipe: Recipe, tasks: list[Task]) -> dict:
        """Merge this process's new results into the section as it is on disk now, under eval.json's
        lock (files.update_json_locked), keeping the rest of the file and other writers' results."""
        def change(doc: dict) -> dict:
            self._take(doc)
            for evaluation, results in self.fresh.items():
                self.results.setdefault(evaluation, {}).update(results)
            doc = doc or {"version": 1, "recipe": recipe.name}
            doc[SECTION] = self._section(recipe, tasks)
            return doc

        section = update_json_locked(self.path, change, WHAT, FIX)[SECTION]
        self.fresh, self.known = {}, section["tasks"]
        return section

    def _section(self, recipe: Recipe, tasks: list[Task]) -> dict:
        listed = {t["name"]: t for t in self.known}
        for t in tasks:
            listed[t.name] = {"name": t.name, "file": str(t.file) if t.file else None,
                              "stage": recipe.stages[t.stage].name if t.stage is not None else None,
                              "stage_index": t.stage}
        order = [INIT] + [s.name for s in recipe.stages]
        section = {"tasks": list(listed.values()), "evaluations": [e for e in order if e in self.results],
                   "results": self.results}
        section["metrics"] = task_metrics(section, [s.name for s in recipe.stages])
        return section


def task_metrics(section: dict, stages: list[str]) -> dict:
    """AA, AIA, FGT, BWT, FWD per metric over the tasks, after each stage with a full row."""
    results, tasks = section["results"], section["tasks"]
    rows = []
    for stage in stages:
        if stage not in results:
            break
        rows.append(stage)
    names = sorted({m for r in results.values() for t in r.values() for m in t["metrics"]})
    out = {}
    for metric in names:
        cols = [t for t in tasks if any(metric in results[e].get(t["name"], {}).get("metrics", {}) for e in results)]

        def score(evaluation: str, task: dict, metric: str = metric) -> float | None:
            m = results.get(evaluation, {}).get(task["name"], {}).get("metrics", {}).get(metric)
            return m["value"] if m else None

        higher = next(results[e][t["name"]]["metrics"][metric]["higher_is_better"] for e in results
                      for t in cols if metric in results[e].get(t["name"], {}).get("metrics", {}))
        values = cl_metrics([[score(s, t) for t in cols] for s in rows], [t["stage_index"] for t in cols],
                            higher, [score(INIT, t) for t in cols])
        out[metric] = {k: dict(zip(rows, v)) for k, v in values.items()}
    return out


# ------------------------------------------------------------------------------------------------
# Evaluating a run: held-out loss, then the tasks


class TaskEvaluation:
    """The held-out evaluation, then the downstream tasks: the trainer's StageEvaluation when the
    recipe names tasks, and `strata eval --tasks`. Every rank makes the same calls; rank 0 runs the
    harness and writes, the others wait at a barrier."""

    def __init__(self, heldout: RunEvaluation, tasks: list[Task]):
        if tasks and not harness_installed():
            raise StrataError(f"evaluation.tasks: lm-evaluation-harness is not installed: {INSTALL}")
        self.heldout, self.recipe, self.tasks = heldout, heldout.recipe, tasks
        self.file = TaskResults(heldout.run_dir)
        self.prints = {t.name: fingerprint(t, self.recipe) for t in tasks}

    def missing(self, evaluation: str) -> list[Task]:
        return [t for t in self.tasks if not self.file.has(evaluation, t.name, self.prints[t.name])]

    def fill_in(self, tokenizer: Any = None, quiet: bool = False) -> list[str]:
        """Held-out fill-in, then the tasks for the initial model and every finished stage lacking them."""
        ran = self.heldout.fill_in(tokenizer, quiet)
        for index in [-1, *self.heldout.finished_stages()]:
            name = INIT if index < 0 else self.recipe.stages[index].name
            if not self.missing(name):
                continue
            if self.heldout.rank == 0:
                self._run(name, self.heldout.load_model(index, tokenizer), self._export(index))
            self._sync()
            if name not in ran:
                ran.append(name)
        return ran

    def evaluate(self, stage: str, model: torch.nn.Module) -> dict:
        """After a stage (every rank): held-out loss, then the tasks on the stage's model."""
        self.heldout.evaluate(stage, model)
        if not self.missing(stage):
            return {}
        results = {}
        if self.heldout.rank == 0:
            index = self.recipe.stage_index(stage)
            live = self.heldout.world == 1 and self.recipe.zero_stage < 3
            results = self._run(stage, model if live else self.heldout.load_model(index, None), self._export(index))
        self._sync()
        return results

    def evaluate_unmerged(self, stage: str, model: torch.nn.Module) -> dict:
        """A merging stage's trained weights before its merge: held-out loss only (tasks score the merge)."""
        return self.heldout.evaluate_unmerged(stage, model)

    def _export(self, index: int) -> Path | None:
        return None if index < 0 else export_dir(self.heldout.run_dir, index, self.recipe.stages[index].name)

    def _run(self, evaluation: str, model: torch.nn.Module, export: Path | None) -> dict:
        from pipeline.evaluate.decontaminate import task_samples

        todo = self.missing(evaluation)
        samples = task_samples(self.recipe, self.heldout.run_dir, evaluation, [t.name for t in todo])
        results = run_tasks(model, hf_tokenizer(export, self.recipe), todo, self.recipe, samples)
        for name, r in results.items():
            r["fingerprint"] = self.prints[name]
        self.file.add(evaluation, results)
        self.file.write(self.recipe, self.tasks)
        LOG.info(f"tasks {evaluation}: " + " | ".join(
            f"{n} " + " ".join(f"{m} {v['value']:.3f}" + (f"±{v['stderr']:.3f}" if v["stderr"] is not None else "")
                               for m, v in r["metrics"].items()) for n, r in results.items()))
        return results

    def _sync(self) -> None:
        """Rank 0 has written eval.json: every rank reads it, so all see the same missing tasks."""
        if self.heldout.world > 1:
            dist.barrier()
            self.file = TaskResults(self.heldout.run_dir)
