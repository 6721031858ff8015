"""`strata sweep RECIPE --stage NAME`: choose a stage's replay ratio (or a source weight) from short
proxy runs, by fitting a law of loss against tokens and share (pipeline/evaluate/sweep_law.py).

Order of work: the proxies' total compute is printed and checked against --budget before anything
trains; the stages before NAME are trained once (sweeps/NAME/base); each proxy is a normal Strata
run (pipeline/commands/sweep_runs.py), skipped when finished and resumed when killed; then every
domain's law is fitted, and plan.json, plan.png, a table and the recipe patch are written.
`--only VALUE` (or `--only base`) trains just that part, for a SLURM array of independent jobs.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.commands.recipe_file import open_recipe
from pipeline.commands.sweep_runs import (
    Knob,
    Proxy,
    finished,
    losses,
    proxies,
    run_proxy,
    sweep_dir,
    train_base,
)
from pipeline.errors import StrataError
from pipeline.files import write_json_atomic, write_text_atomic
from pipeline.recipe.plan import build_plan, stage_mixture
from pipeline.recipe.spec import Recipe

HELP = "fit a replay/mixture law on short proxy runs of one stage and recommend the ratio"
DEFAULT_REPLAY = (0.0, 0.05, 0.1, 0.25)
TOKEN_STEPS = (0.25, 0.5, 1.0)  # the proxies' token budgets, relative to the largest


class SweepArgumentError(StrataError):
    exit_code = 2  # a bad option: like a bad recipe, nothing ran


@dataclass(frozen=True)
class SweepRun:
    """One sweep as the command carries it: the recipe, what varies, the proxies and where they go."""

    recipe: Recipe
    knob: Knob
    runs: list[Proxy]
    full_tokens: int  # the stage's full budget
    run_dir: Path

    @property
    def index(self) -> int:
        return self.knob.index

    @property
    def stage(self) -> str:
        return self.recipe.stages[self.index].name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe")
    parser.add_argument("--stage", required=True, help="the stage to plan")
    parser.add_argument("--replay", help=f"replay ratios to run, comma-separated (default {','.join(map(str, DEFAULT_REPLAY))} "
                        "and the recipe's own)")
    parser.add_argument("--weights", help="instead of replay: SOURCE=W1,W2,... weights of one of the stage's sources")
    parser.add_argument("--budget", type=float, default=0.3,
                        help="the proxies' total tokens as a fraction of the stage's (default 0.3)")
    parser.add_argument("--fractions", help="the proxies' token budgets as fractions of the stage's, comma-separated "
                        "(default: three, 1/4, 1/2 and 1 of the largest the budget allows)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest allowed relative rise of an old domain's loss (default 0.02)")
    parser.add_argument("--run-dir", help="run folder (default runs/<recipe name>); proxies go to RUN_DIR/sweeps/NAME")
    parser.add_argument("--only", help="train only this value's proxies (or `base`) and stop: one job of an array")
    parser.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits for the uncertainty (default 100)")
    parser.add_argument("--write", action="store_true", help="write the recipe with the recommended value beside it")


def _floats(text: str, option: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SweepArgumentError(f"{option}: not a comma-separated list of numbers: {text!r}") from None
    if not values:
        raise SweepArgumentError(f"{option}: give at least one value")
    return values


def knob_and_values(args: argparse.Namespace, recipe: Recipe, index: int) -> tuple[Knob, list[float]]:
    stage = recipe.stages[index]
    if args.weights:
        source, _, text = args.weights.partition("=")
        names = [s.name for s in stage.sources]
        if source not in names:
            raise SweepArgumentError(f"--weights: stage {stage.name!r} has no source {source!r} (it has {', '.join(names)})")
        if len(names) < 2:
            raise SweepArgumentError(f"--weights: stage {stage.name!r} has one source; its weight changes nothing")
        values = _floats(text, "--weights")
        if values[0] <= 0:
            raise SweepArgumentError("--weights: weights must be > 0")
        return Knob(index, source), values
    if args.replay:
        values = _floats(args.replay, "--replay")
    else:
        values = sorted(set(DEFAULT_REPLAY) | ({stage.replay.ratio} if stage.replay else set()))
    if values[0] < 0 or values[-1] >= 1:
        raise SweepArgumentError("--replay: ratios must be in [0, 1)")
    if index == 0 and not recipe.pretraining and values[-1] > 0:
        raise SweepArgumentError(f"--replay: stage {stage.name!r} is the first and the recipe has no `pretraining:` "
                                 "sources: there is nothing to replay")
    return Knob(index), values


def proxy_steps(args: argparse.Namespace, values: int, full_steps: int) -> list[int]:
    """Optimizer steps of the proxies at each value: three or more distinct counts."""
    if args.fractions:
        fractions = _floats(args.fractions, "--fractions")
        if fractions[0] <= 0:
            raise SweepArgumentError("--fractions: must be > 0")
    else:
        top = args.budget / (values * sum(TOKEN_STEPS))
        fractions = [top * f for f in TOKEN_STEPS]
    steps = []
    for f in fractions:  # rounded down (within the budget), each one step more than the one before at least
        steps.append(max(math.floor(f * full_steps + 1e-9), steps[-1] + 1 if steps else 1))
    return steps


def run(args: argparse.Namespace) -> int:
    from pipeline.data.shards import prepared_tokens
    from pipeline.distributed import join

    recipe = open_recipe(args.recipe)
    names = [s.name for s in recipe.stages]
    if args.stage not in names:
        raise SweepArgumentError(f"--stage: {args.recipe} has no stage {args.stage!r} (stages: {', '.join(names)})")
    index = names.index(args.stage)
    for option, value, low in (("--budget", args.budget, 0.0), ("--tolerance", args.tolerance, -1e-12)):
        if not value > low:
            raise SweepArgumentError(f"{option}: must be {'> 0' if low == 0 else '>= 0'}, got {value:g}")
    knob, values = knob_and_values(args, recipe, index)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / recipe.name
    full = build_plan(recipe, prepared_tokens(recipe))[index].tokens
    if full is None:
        raise StrataError(f"{args.recipe}: stage {args.stage!r} has no `tokens:` and its sources are not prepared; "
                          "run `strata prepare` first")
    per_step = recipe.batch.global_ * recipe.seq_len
    runs = proxies(run_dir, args.stage, knob, values, proxy_steps(args, len(values), math.ceil(full / per_step)), per_step)
    compute = sum(p.tokens for p in runs) / full
    print(f"sweep of {knob.key(recipe)} over {', '.join(f'{v:g}' for v in values)}: {len(runs)} proxies of "
          f"{', '.join(sorted({f'{p.steps}' for p in runs}, key=int))} steps = {compute:.1%} of one full run of stage "
          f"{args.stage!r} ({full:,} tokens); budget {args.budget:.0%}", flush=True)
    if compute > args.budget + 1e-9:
        raise SweepArgumentError(f"--budget: the proxies need {compute:.1%} of a full run, more than {args.budget:.0%}; "
                                 "raise --budget, or give fewer values or smaller --fractions")
    join(deepspeed_engine=True)  # as the trainer does: one process, or every rank under torchrun
    sweep = SweepRun(recipe, knob, runs, full, run_dir)
    if args.only is not None:
        return _only(args, sweep)
    base = train_base(recipe, run_dir, args.stage, index)
    for p in runs:
        _run_one(sweep, p, base)
    if not all(finished(p.folder, args.stage) for p in runs) or int(os.environ.get("RANK", "0")) != 0:
        return 0
    return _plan(args, sweep)


def _run_one(sweep: SweepRun, proxy: Proxy, base: Path | None) -> None:
    ran = run_proxy(sweep.recipe, sweep.knob, proxy, base)
    print(f"proxy {sweep.knob.label(proxy.value)} x {proxy.steps} steps: {'trained' if ran else 'finished before'} "
          f"({proxy.folder})", flush=True)


def _only(args: argparse.Namespace, sweep: SweepRun) -> int:
    """One job of an array: the base (`--only base`), or the proxies of one value."""
    labels = {sweep.knob.label(p.value): None for p in sweep.runs}
    mine = [p for p in sweep.runs if args.only in (sweep.knob.label(p.value), f"{p.value:g}")]
    if args.only != "base" and not mine:
        raise SweepArgumentError(f"--only: {args.only!r} is neither `base` nor a swept value ({', '.join(labels)})")
    base = train_base(sweep.recipe, sweep.run_dir, sweep.stage, sweep.index)
    for p in mine:
        _run_one(sweep, p, base)
    return 0


def _plan(args: argparse.Namespace, sweep: SweepRun) -> int:
    """Fit, predict, recommend; write plan.json and plan.png, print the table and the patch."""
    from pipeline.evaluate.sweep_plan import Measured, make_plan
    from pipeline.evaluate.sweep_report import plot, table

    recipe, knob, runs = sweep.recipe, sweep.knob, sweep.runs
    plan = make_plan(_law_inputs(sweep, args.tolerance),
                     [Measured(p.value, p.tokens, losses(p.folder, sweep.stage)) for p in runs], args.bootstrap)
    out = sweep_dir(sweep.run_dir, sweep.stage)
    doc = plan.as_dict()
    doc["patch"] = {knob.key(recipe): plan.recommended}
    doc["proxies"] = [str(p.folder) for p in runs]
    write_json_atomic(out / "plan.json", doc)
    print(table(plan))
    if plot(plan, out / "plan.png"):
        print(f"trade-off plot: {out / 'plan.png'}")
    print(f"plan: {out / 'plan.json'}\nrecipe patch: {knob.key(recipe)}: {_current(recipe, knob)} -> {plan.recommended:g}")
    if args.write:
        _write_patched(Path(args.recipe), knob, plan.recommended, out / "plan.json")
    return 0


def _law_inputs(sweep: SweepRun, tolerance: float):
    """The plan's view of the sweep: each domain's role, its loss before the stage, its share."""
    from pipeline.evaluate.heldout import EvalFile
    from pipeline.evaluate.sweep_plan import NEW, OLD, OTHER, Sweep

    recipe, index, first = sweep.recipe, sweep.index, sweep.runs[0].folder
    before = losses(first, recipe.stages[index - 1].name if index else "init")
    roles = {d["name"]: (NEW if d["stage_index"] == index else OTHER if d["kind"] == "eval" else OLD)
             for d in EvalFile(first).doc.get("domains", [])}

    def share(value: float) -> dict[str, float]:
        mixture = stage_mixture(sweep.knob.apply(recipe, value), index)
        return {d: sum(c.share for c in mixture if c.source == d) for d in roles}

    return Sweep(sweep.knob.key(recipe), sweep.full_tokens, roles, before, share, tolerance)


def _write_patched(recipe_file: Path, knob: Knob, value: float, plan_file: Path) -> None:
    """--write: the recipe as written, with the recommended value, beside it (NAME.STAGE-sweep.yaml)."""
    raw = yaml.safe_load(recipe_file.read_text())
    knob.patch(raw, value)
    stage = raw["stages"][knob.index]["name"]
    target = recipe_file.with_name(f"{recipe_file.stem}.{stage}-sweep.yaml")
    write_text_atomic(target, f"# {recipe_file.name} with the value `strata sweep` recommended ({plan_file})\n"
                      + yaml.safe_dump(raw, sort_keys=False))
    print(f"wrote {target}")


def _current(recipe: Recipe, knob: Knob) -> str:
    stage = recipe.stages[knob.index]
    if knob.source is None:
        return f"{stage.replay.ratio:g}" if stage.replay else "none"
    return f"{next(s.weight for s in stage.sources if s.name == knob.source):g}"

