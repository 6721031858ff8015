"""Contamination of every evaluation set by the training data of each stage (pipeline/data/ngrams.py).

Invariant: the share reported for (set, stage) counts the set's items that share an n-gram with a
training document of a source learned up to that stage: pretraining:, then the own sources of
every stage up to it (replay only reads those again). It is a function of the prepared data
alone, so `strata check` shows it before training and eval.json stores the same numbers.

The section (eval.json's "contamination", and what `strata check` prints):

    {"ngram", "sample", "warn", "sets": {name: {"kind": "heldout" | "eval" | "task", "items",
     "stages": {stage: {"contaminated", "share"[, "ids"]}}}}, "missing": [sources without an index]}

Task items carry "ids" (their index in the task's evaluation documents) per stage, so that
`evaluation.decontaminate: drop` can leave them out of scoring.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.dedup import training_sources
from pipeline.data.ngrams import SourceNgrams, contaminated_docs, ngram_hashes
from pipeline.data.shards import own_tokenizers, source_folder
from pipeline.recipe.spec import Recipe


def _ngrams(recipe: Recipe, name: str, own: dict[str, str]) -> SourceNgrams | None:
    return SourceNgrams.read(source_folder(recipe, name, own.get(name, recipe.tokenizer)))


def learned_up_to(recipe: Recipe) -> list[list[str]]:
    """The training sources learned up to each stage: pretraining:, then each stage's own sources."""
    learned = [s.name for s in recipe.pretraining]
    out = []
    for stage in recipe.stages:
        learned = learned + [s.name for s in stage.sources]
        out.append(learned)
    return out


def task_queries(items: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n-gram hashes, item index of each) of a task's items."""
    hashes = [ngram_hashes(t, n) for t in items]
    doc = [np.full(len(h), k, dtype=np.int64) for k, h in enumerate(hashes)]
    cat = np.concatenate
    return (cat(hashes) if hashes else np.zeros(0, np.uint64)), (cat(doc) if doc else np.zeros(0, np.int64))


def contamination(recipe: Recipe, tasks: dict[str, list[str]] | None = None) -> dict:
    """The contamination section for the prepared sources and `tasks` (task name -> item texts)."""
    d = recipe.data.decontamination
    trained = [s.name for s, _ in training_sources(recipe)]
    own = own_tokenizers(recipe)
    indexes = {name: _ngrams(recipe, name, own) for name in trained}
    missing = [name for name, ng in indexes.items() if ng is None]
    sets: dict[str, dict] = {}
    queries = []
    for src in recipe.all_sources():
        ng = _ngrams(recipe, src.name, own)
        if ng is not None and ng.documents:
            queries.append((src.name, "heldout" if src.name in trained else "eval", ng.queries, ng.query_doc,
                            ng.documents))
    for name, items in (tasks or {}).items():
        queries.append((name, "task", *task_queries(items, d.ngram), len(items)))
    for name, kind, q, doc, items in queries:
        entry = {"kind": kind, "items": items, "stages": {}}
        by_source = {src: contaminated_docs(q, doc, ng.index, d.sample) for src, ng in indexes.items() if ng is not None}
        for stage, learned in zip(recipe.stages, learned_up_to(recipe)):
            parts = [by_source[src] for src in learned if src in by_source]
            hit = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
            row = {"contaminated": int(len(hit)), "share": len(hit) / items}
            if kind == "task":
                row["ids"] = [int(k) for k in hit]
            entry["stages"][stage.name] = row
        sets[name] = entry
    return {"ngram": d.ngram, "sample": d.sample, "warn": d.warn, "sets": sets, "missing": missing}


def contamination_lines(section: dict) -> tuple[list[str], list[str]]:
    """Printable lines (one per set: its share after each stage) and warnings above the threshold."""
    lines, warnings = [], []
    for name, entry in section["sets"].items():
        shares = " | ".join(f"{stage} {row['share']:.1%} ({row['contaminated']:,})"
                            for stage, row in entry["stages"].items())
        lines.append(f"{name:<20} {entry['kind']:<8} {entry['items']:>7,} items  {shares}")
        worst = max(entry["stages"].items(), key=lambda kv: kv[1]["share"], default=None)
        if worst is not None and worst[1]["share"] > section["warn"]:
            warnings.append(f"{entry['kind']} set {name!r}: {worst[1]['share']:.1%} of its items share a "
                            f"{section['ngram']}-word n-gram with the training data up to stage {worst[0]!r} "
                            f"(above data.decontamination.warn = {section['warn']:g})")
    if section["missing"]:
        warnings.append("no n-gram index for source(s) " + ", ".join(section["missing"]) +
                        " (prepared before decontamination existed, or not yet): run strata prepare")
    return lines, warnings
