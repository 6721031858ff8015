"""`strata report RUN_DIR`: report.md and PNG plots of a run, from the files in its run folder.

It reads only what the run wrote -- run.json, recipe.yaml, metrics.jsonl, eval.json -- so a report
can be made anywhere the folder is copied to, without the data or the model:

    loss.png         training loss per global step, stage boundaries marked
    lr.png           the learning rate across stages (re-warmed at each boundary)
    forgetting.png   heatmap domains x evaluations: loss now minus loss after the domain's own stage
    domain_loss.png  held-out loss of each domain after each stage
    task_scores.png  downstream task scores per stage (when eval.json has lm-eval results)
    selection.png    RHO-1 selected fraction per step (only when metrics.jsonl has it)

report.md holds the tables: stages, the loss / accuracy matrices, the continual-learning metrics
(see pipeline/evaluate/metrics.py for the formulas and signs), and replay shares, what each stage-end
merge bought, and token selection where the recipe uses them.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.errors import StrataError
from pipeline.evaluate.task_report import PLOT as TASK_PLOT
from pipeline.evaluate.task_report import task_plot, task_tables
from pipeline.files import read_json, write_text_atomic
from pipeline.recipe.yaml_file import read_yaml
from pipeline.train.run_folder import METRICS, read_metrics, step_offsets

STANDARD_KEYS = {"stage", "stage_name", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "step_s",
                 "data_s", "time"}


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


class Run:
    """What a run folder holds, in the shapes the plots and tables need."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.recipe = read_yaml(self.dir / "recipe.yaml") if (self.dir / "recipe.yaml").is_file() else None
        self.manifest = read_json(self.dir / "run.json", "run manifest")
        if self.recipe is None and self.manifest is None:
            raise StrataError(f"{self.dir}: not a run folder (no recipe.yaml or run.json)")
        metrics = read_metrics(self.dir)  # a torn last line (a kill) is skipped, with a note
        self.rows = metrics.rows
        self.notes = [n for n in [metrics.note(self.dir / METRICS)] if n]
        self.eval = read_json(self.dir / "eval.json", "evaluation results", "delete it and run `strata eval`")
        stages = (self.manifest or {}).get("stages") or [{"name": s["name"]} for s in self.recipe.get("stages", [])]
        self.stages = stages
        self.names = [s["name"] for s in stages]
        # Global step offset of each stage: the planned steps of earlier stages (run.json), else the logged ones.
        logged = {}
        for r in self.rows:
            logged[r["stage"]] = max(logged.get(r["stage"], 0), r["step"])
        *self.offsets, self.total_steps = step_offsets([s.get("steps") or logged.get(i, 0) for i, s in enumerate(stages)])

    def global_step(self, row: dict) -> int:
        return self.offsets[row["stage"]] + row["step"] if row["stage"] < len(self.offsets) else row["step"]


# ------------------------------------------------------------------------------------------------
# Plots


def _boundaries(ax, run: Run) -> None:
    for i, (offset, name) in enumerate(zip(run.offsets, run.names)):
        if i > 0:
            ax.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(name, (offset, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="dimgrey")


def _curve(run: Run, key: str, ylabel: str, title: str, out: Path, log: bool = False) -> bool:
    import matplotlib.pyplot as plt

    rows = [r for r in run.rows if r.get(key) is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, name in enumerate(run.names):
        mine = [r for r in rows if r["stage"] == i]
        if mine:
            ax.plot([run.global_step(r) for r in mine], [r[key] for r in mine], label=name, linewidth=1.2)
    _boundaries(ax, run)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="global step", ylabel=ylabel, title=title)
    return _save(fig, ax, out)


def _save(fig, ax, out: Path) -> bool:
    """The finish every line plot shares: grid, legend, tight layout, PNG."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _eval_rows(run: Run) -> tuple[list[str], list[dict]]:
    ev = run.eval or {}
    return ev.get("evaluations", []), ev.get("domains", [])


def _forgetting(run: Run, out: Path) -> bool:
    """Loss after each evaluation minus the loss right after the domain's own stage (eval sets: the initial model)."""
    import matplotlib.pyplot as plt
    import numpy as np

    evaluations, domains = _eval_rows(run)
    loss = (run.eval or {}).get("loss", {})
    if not evaluations or not domains:
        return False
    grid = np.full((len(domains), len(evaluations)), np.nan)
    for d_i, d in enumerate(domains):
        # eval sets and the pretraining corpus are measured from the initial model
        anchor = d["stage"] if d["stage"] is not None and d.get("kind") != "pretraining" else "init"
        if anchor not in evaluations or d["name"] not in loss.get(anchor, {}):
            continue
        start = evaluations.index(anchor)
        for e_i in range(start, len(evaluations)):
            value = loss.get(evaluations[e_i], {}).get(d["name"])
            if value is not None:
                grid[d_i, e_i] = value - loss[anchor][d["name"]]
    if np.isnan(grid).all():
        return False
    limit = max(float(np.nanmax(np.abs(grid))), 1e-6)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(evaluations), 1.2 + 0.5 * len(domains)))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    for (y, x), value in np.ndenumerate(grid):
        strong = not np.isnan(value) and abs(value) > 0.6 * limit  # white text on the dark cells
        ax.text(x, y, "–" if np.isnan(value) else f"{value:+.3f}", ha="center", va="center", fontsize=8,
                color="white" if strong else "black")
    ax.set_xticks(range(len(evaluations)), [f"after {e}" if e != "init" else "init" for e in evaluations],
                  rotation=30, ha="right", fontsize=8)
    labels = [f"{d['name']} ({d['stage'] or 'eval set'})" for d in domains]
    ax.set_yticks(range(len(domains)), labels, fontsize=8)
    ax.set_title("forgetting: loss minus loss after the domain's stage (red = forgot)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _domain_loss(run: Run, out: Path) -> bool:
    import matplotlib.pyplot as plt

    evaluations, domains = _eval_rows(run)
    loss = (run.eval or {}).get("loss", {})
    if not evaluations or not domains:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for d in domains:
        xs = [i for i, e in enumerate(evaluations) if d["name"] in loss.get(e, {})]
        ax.plot(xs, [loss[evaluations[i]][d["name"]] for i in xs], marker="o",
                label=f"{d['name']} ({d['stage'] or 'eval set'})")
    ax.set_xticks(range(len(evaluations)), [f"after {e}" if e != "init" else "init" for e in evaluations],
                  rotation=20, fontsize=8)
    ax.set(ylabel="held-out loss", title="per-domain loss after each stage")
    return _save(fig, ax, out)


# ------------------------------------------------------------------------------------------------
# Tables


def _stage_table(run: Run) -> list[str]:
    """Per stage: steps, tokens, the objective's and the CE's first and final values, the methods.

    `loss` is the whole objective (CE + KL + penalty in a stage that distills or regularises);
    metrics.jsonl's `ce` is its cross-entropy part, and equals `loss` in a stage without terms."""
    rows = []
    for i, s in enumerate(run.stages):
        mine = [r for r in run.rows if r["stage"] == i]
        tokens = f"{mine[-1]['tokens']:,}" if mine else "–"
        ce = [r.get("ce", r["loss"]) for r in mine]
        rows.append([str(i + 1), s["name"], s.get("status", "?"), str(s.get("steps") or "–"), tokens,
                     _fmt(mine[0]["loss"]) if mine else "–", _fmt(s.get("final_loss", mine[-1]["loss"] if mine else None)),
                     _fmt(ce[0]) if ce else "–", _fmt(ce[-1]) if ce else "–", _methods(run, i)])
    return _table(["#", "stage", "status", "steps", "tokens", "first loss", "final loss", "first CE", "final CE",
                   "methods"], rows)


def _methods(run: Run, index: int) -> str:
    """What stage `index` used besides plain training, from the recipe as run (`–` for none)."""
    stages = (run.recipe or {}).get("stages", [])
    s = stages[index] if index < len(stages) else {}
    used = []
    if (s.get("replay") or {}).get("ratio"):
        used.append(f"replay {s['replay']['ratio']:.0%}" + (" (generated)" if s["replay"].get("generate") else ""))
    if s.get("adapter"):
        kind = s["adapter"].get("type", "lora")
        used.append(f"LoRA r={s['adapter'].get('r', 8)}" if kind == "lora" else f"adapter ({kind})")
    if s.get("expand"):
        e = s["expand"]
        used.append(f"MoE ({e.get('experts') or '+' + str(e.get('add_experts'))} experts)" if e.get("method") == "moe"
                    else f"expand ({e.get('method')}, +{e.get('add_layers')} layers)")
    if s.get("distill"):
        used.append(f"distill (teacher {s['distill'].get('teacher')}, on {s['distill'].get('on', 'all')})")
    if s.get("selection"):
        used.append(f"{str(s['selection'].get('method', 'rho1')).upper().replace('RHO1', 'RHO-1')} "
                    f"(keep {s['selection'].get('ratio')})")
    if s.get("regularize"):
        used.append(f"regularize ({s['regularize'].get('method')})")
    if s.get("merge"):
        used.append(f"merge ({s['merge'].get('method')})")
    if s.get("trainable"):
        used.append("trainable: " + ", ".join(s["trainable"]))
    if s.get("tokenizer"):
        used.append("new tokenizer")
    return "; ".join(used) or "–"


def _matrix_tables(run: Run) -> list[str]:
    evaluations, domains = _eval_rows(run)
    if not evaluations:
        return ["No evaluation yet: run `strata eval RUN_DIR` (or train with held-out data, `data.heldout` > 0)."]
    lines = []
    for measure, digits in (("loss", 4), ("perplexity", 2), ("accuracy", 4)):
        table = run.eval.get(measure, {})
        header = ["after"] + [f"{d['name']} ({d['stage'] or 'eval set'})" for d in domains]
        rows = [[e] + [_fmt(table.get(e, {}).get(d["name"]), digits) for d in domains] for e in evaluations]
        lines += [f"**{measure}**", "", *_table(header, rows), ""]
    return lines


def _cl_table(run: Run) -> list[str]:
    metrics = (run.eval or {}).get("metrics", {})
    lines = []
    for measure in ("loss", "accuracy"):
        m = metrics.get(measure)
        if not m or not m.get("AA"):
            continue
        stages = list(m["AA"])
        rows = [[s] + [_fmt(m[k].get(s)) for k in ("AA", "AIA", "FGT", "BWT", "FWD")] for s in stages]
        lines += [f"**{measure}**", "", *_table(["after stage", "AA", "AIA", "FGT", "BWT", "FWD"], rows), ""]
    if lines:
        lines = ["Signs: FGT > 0 is forgetting (for loss: rise over the best loss since the domain's stage); "
                 "BWT > 0 and FWD > 0 are improvements; AA/AIA are in the measure's units (lower loss is better). "
                 "Evaluation-only sets enter none of these.", ""] + lines
    return lines


def _role(domain: dict, index: int) -> str:
    """A domain as seen from stage `index`: learned earlier, in this stage, later, or an eval set."""
    at = domain.get("stage_index")
    if at is None:
        return "eval set"
    return "earlier" if at < index else "this stage" if at == index else "later"


def _merge_table(run: Run) -> list[str]:
    """Held-out loss of each merging stage's trained weights and of its merge (eval.json's loss_unmerged)."""
    ev = run.eval or {}
    merged, rows = ev.get("loss", {}), []
    for stage, unmerged in ev.get("loss_unmerged", {}).items():
        index = run.names.index(stage) if stage in run.names else len(run.names)
        for d in ev.get("domains", []):
            before, after = unmerged.get(d["name"]), merged.get(stage, {}).get(d["name"])
            if before is None:
                continue
            gain = f"{after - before:+.4f}" if after is not None else "–"
            rows.append([stage, f"{d['name']} ({_role(d, index)})", _fmt(before), _fmt(after), gain])
    if not rows:
        return []
    return ["## What the merge bought", "",
            "Held-out loss after each stage with `merge:`: its trained weights (`hf-unmerged/`) and the merge the "
            "run continued from (`hf/`, the model of every table above). A negative change is loss the merge "
            "saved (typically on earlier domains); a positive one is what it cost (typically the stage's own).", "",
            *_table(["stage", "domain", "loss unmerged", "loss merged", "merged - unmerged"], rows), ""]


def _contamination_table(run: Run) -> list[str]:
    """Share of each evaluation set's items sharing an n-gram with the training data up to each stage."""
    from pipeline.data.contamination import contamination_lines

    section = (run.eval or {}).get("contamination")
    if not section or not section["sets"]:
        return []
    stages = list(next(iter(section["sets"].values()))["stages"])
    rows = [[name, e["kind"], f"{e['items']:,}", *(f"{e['stages'][s]['share']:.1%}" for s in stages)]
            for name, e in section["sets"].items()]
    _, warnings = contamination_lines(section)
    return ["## Contamination", "", f"Share of items sharing a {section['ngram']}-word n-gram with the training "
            "data up to each stage.", "", *_table(["set", "kind", "items", *stages], rows), "",
            *[f"**Warning**: {w}" for w in warnings], *([""] if warnings else [])]


def _replay_table(run: Run) -> list[str]:
    stages = (run.recipe or {}).get("stages", [])
    rows = []
    for i, s in enumerate(stages):
        replay = s.get("replay")
        if not replay or not replay.get("ratio"):
            continue
        origin = replay.get("from") or (["pretraining"] if run.recipe.get("pretraining") else []) + [t["name"] for t in stages[:i]]
        shares = ""
        try:
            from pipeline.recipe.load import parse_recipe
            from pipeline.recipe.plan import stage_mixture

            recipe = parse_recipe(run.recipe, str(run.dir / "recipe.yaml"), run.dir, prepared=True)
            shares = ", ".join(f"{c.source} {c.share:.1%}" for c in stage_mixture(recipe, i) if c.replay_of)
        except Exception:  # the data or the tokenizer moved: the ratio alone is still worth showing
            pass
        observed = [r[k] for r in run.rows if r["stage"] == i for k in r if "replay" in k and r[k] is not None
                    and isinstance(r[k], (int, float))]
        seen = _fmt(sum(observed) / len(observed), 3) if observed else "–"
        rows.append([s["name"], f"{replay['ratio']:.1%}", ", ".join(origin), shares or "–", seen])
    if not rows:
        return []
    return ["## Replay", "", *_table(["stage", "replay share", "from", "planned per source", "logged (mean)"], rows), ""]


def _selection_keys(run: Run) -> list[str]:
    keys = {k for r in run.rows for k in r if k not in STANDARD_KEYS and "select" in k}
    return sorted(k for k in keys if any(isinstance(r.get(k), (int, float)) for r in run.rows))


def _selection_table(run: Run) -> list[str]:
    keys = _selection_keys(run)
    stages = (run.recipe or {}).get("stages", [])
    rows = []
    for i, name in enumerate(run.names):
        sel = stages[i].get("selection") if i < len(stages) else None
        values = {k: [r[k] for r in run.rows if r["stage"] == i and isinstance(r.get(k), (int, float))] for k in keys}
        if not sel and not any(values.values()):
            continue
        target = f"{sel.get('ratio', '?')}" if sel else "–"
        rows.append([name, (sel or {}).get("method", "–"), target]
                    + [_fmt(sum(v) / len(v), 3) if v else "–" for v in values.values()])
    if not rows:
        return []
    return ["## Token selection (RHO-1)", "", *_table(["stage", "method", "ratio"] + [f"{k} (mean)" for k in keys], rows), ""]


# ------------------------------------------------------------------------------------------------


def write_report(run_dir: Path) -> tuple[Path, list[str]]:
    """Write RUN_DIR/report.md and its PNGs; returns the path of report.md and the notes on what
    was read (a torn last metrics line), which the report holds too and `strata report` shows."""
    import matplotlib

    matplotlib.use("Agg")
    run = Run(run_dir)
    plots = []
    for name, made in (
        ("loss.png", lambda p: _curve(run, "loss", "training loss", "training loss per step", p)),
        ("lr.png", lambda p: _curve(run, "lr", "learning rate", "learning rate across stages", p)),
        ("forgetting.png", lambda p: _forgetting(run, p)),
        ("domain_loss.png", lambda p: _domain_loss(run, p)),
        (TASK_PLOT, lambda p: task_plot(run.eval, p, _save)),
        *[(f"{k}.png", lambda p, k=k: _curve(run, k, k, f"{k} per step", p)) for k in _selection_keys(run)],
    ):
        path = run.dir / name
        if made(path):
            plots.append(name)
        elif path.exists():
            path.unlink()  # a stale plot of an older state of the run
    title = (run.manifest or {}).get("recipe") or (run.recipe or {}).get("name", run.dir.name)
    lines = [f"# Strata run report: {title}", "", f"Run folder `{run.dir}`; {len(run.stages)} stage(s), "
             f"{run.total_steps} steps, {len(run.rows)} logged step(s).", "", *[f"Note: {n}" for n in run.notes],
             *([""] if run.notes else []), "## Stages", "", *_stage_table(run), ""]
    for name, caption in (("loss.png", "Training loss"), ("lr.png", "Learning rate")):
        if name in plots:
            lines += [f"![{caption}]({name})", ""]
    lines += ["## Held-out evaluation", "", *_matrix_tables(run)]
    for name, caption in (("domain_loss.png", "Per-domain loss"), ("forgetting.png", "Forgetting")):
        if name in plots:
            lines += [f"![{caption}]({name})", ""]
    cl = _cl_table(run)
    if cl:
        lines += ["## Continual-learning metrics", "", *cl]
    lines += task_tables(run.eval, _table)  # lm-evaluation-harness scores per stage, if any
    lines += _contamination_table(run)
    lines += _replay_table(run)
    lines += _merge_table(run)
    lines += _selection_table(run)
    lines += [f"![{k}]({k})" for k in plots if k[:-4] in _selection_keys(run)]
    out = run.dir / "report.md"
    write_text_atomic(out, "\n".join(lines).rstrip() + "\n")
    return out, list(run.notes)
