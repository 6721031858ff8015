"""The report's downstream-task section: a table of task scores per stage and task_scores.png.

Reads eval.json's "tasks" section (pipeline/evaluate/harness.py writes it), nothing else, so the
report needs neither lm-eval nor the model. Every value is shown with lm-eval's standard error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

PLOT = "task_scores.png"
CL_KEYS = ("AA", "AIA", "FGT", "BWT", "FWD")


def _cell(m: dict | None) -> str:
    if not m:
        return "–"
    return f"{m['value']:.4f}" + (f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else "")


def _metric_names(section: dict) -> list[str]:
    return sorted({m for per in section["results"].values() for r in per.values() for m in r["metrics"]})


def task_tables(eval_doc: dict | None, table: Callable[[list[str], list[list[str]]], list[str]]) -> list[str]:
    """Markdown lines: per metric, evaluations x tasks (value ± stderr), then its CL metrics;
    `table` is the report's Markdown table maker."""
    section = (eval_doc or {}).get("tasks")
    if not section or not section.get("evaluations"):
        return []
    tasks, evaluations, results = section["tasks"], section["evaluations"], section["results"]
    lines = ["## Downstream tasks (lm-evaluation-harness)", ""]
    for metric in _metric_names(section):
        header = ["after"] + [f"{t['name']} ({t['stage'] or 'no stage'})" for t in tasks]
        rows = [[e] + [_cell(results[e].get(t["name"], {}).get("metrics", {}).get(metric)) for t in tasks]
                for e in evaluations]
        lines += [f"**{metric}**", "", *table(header, rows), ""]
        cl = section.get("metrics", {}).get(metric, {})
        if cl.get("AA"):
            body = [[s] + [("–" if cl[k].get(s) is None else f"{cl[k][s]:.4f}") for k in CL_KEYS] for s in cl["AA"]]
            lines += [f"continual-learning metrics on {metric} (tasks mapped to a stage by evaluation.stage):", "",
                      *table(["after stage", *CL_KEYS], body), ""]
    return lines + [f"![Task scores per stage]({PLOT})", ""]


def task_plot(eval_doc: dict | None, out: Path, save: Callable[[Any, Any, Path], bool]) -> bool:
    """Every metric of every task (acc, acc_norm, ...) after each evaluation, with its stderr;
    `save` is the report's finish of a line plot."""
    import matplotlib.pyplot as plt

    section = (eval_doc or {}).get("tasks")
    if not section or not section.get("evaluations"):
        return False
    evaluations, results = section["evaluations"], section["results"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in section["tasks"]:
        names = sorted({m for e in evaluations for m in results[e].get(t["name"], {}).get("metrics", {})})
        for metric in names:
            points = [(i, results[e][t["name"]]["metrics"][metric]) for i, e in enumerate(evaluations)
                      if metric in results[e].get(t["name"], {}).get("metrics", {})]
            ax.errorbar([i for i, _ in points], [m["value"] for _, m in points],
                        yerr=[m["stderr"] or 0.0 for _, m in points], marker="o", capsize=3,
                        label=f"{t['name']} {metric} ({t['stage'] or 'no stage'})")
    ax.set_xticks(range(len(evaluations)), [f"after {e}" if e != "init" else "init" for e in evaluations],
                  rotation=20, fontsize=8)
    ax.set(ylabel="score", title="downstream task scores after each stage")
    return save(fig, ax, out)
