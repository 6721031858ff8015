"""The proxy runs of `strata sweep`: ordinary Strata runs under RUN_DIR/sweeps/NAME/.

Layout, for a sweep of stage NAME (index s) of a recipe:

    sweeps/NAME/base.yaml, base/     the recipe's stages before NAME, trained once (none when s = 0)
    sweeps/NAME/V/Nsteps.yaml        a proxy's recipe: stages 0..s, stage s cut to N optimizer steps
    sweeps/NAME/V/Nsteps/            its run folder: a copy of base/ (checkpoint files hard-linked),
                                     then stage s trained by `strata train` as any run is

where V is the swept value (`0.25` for a replay ratio, `py=2` for a source weight). Every proxy
therefore starts from the same weights, replays the same earlier data and follows the stage's own
LR schedule shape over its shorter budget: a proxy is a complete small stage, not the first steps
of a long one. Invariant: a run folder is only ever written by the trainer, except for its
creation as a copy of base/, which is atomic (built under a temporary name, then renamed), so a
kill at any instant leaves either no folder or one the trainer resumes. A proxy whose stage is
recorded done in run.json with its losses in eval.json is never run again.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.commands import train
from pipeline.distributed import barrier
from pipeline.errors import StrataError
from pipeline.evaluate.heldout import EvalFile
from pipeline.files import replace_dir, temp_dir_for, write_text_atomic
from pipeline.recipe.resolved import resolved_raw
from pipeline.recipe.spec import Recipe, Replay
from pipeline.train.ownership import LOCK_FILE
from pipeline.train.run_folder import read_manifest

LINKED = ("checkpoints", "stages")  # large, never rewritten in place: hard-linked into each proxy


@dataclass(frozen=True)
class Knob:
    """What the sweep varies: the stage's replay ratio, or the weight of one of its sources."""

    index: int  # the stage
    source: str | None = None  # None: the replay ratio

    def key(self, recipe: Recipe) -> str:
        if self.source is None:
            return f"stages[{self.index}].replay.ratio"
        j = [s.name for s in recipe.stages[self.index].sources].index(self.source)
        return f"stages[{self.index}].sources[{j}].weight"

    def label(self, value: float) -> str:
        return f"{value:g}" if self.source is None else f"{self.source}={value:g}"

    def patch(self, raw: dict, value: float) -> None:
        """Set the value in a raw recipe (the YAML as a dict)."""
        stage = raw["stages"][self.index]
        if self.source is None:
            stage["replay"] = {**(stage.get("replay") or {}), "ratio": value}
        else:
            for src in stage["sources"]:
                if src["name"] == self.source:
                    src["weight"] = value

    def apply(self, recipe: Recipe, value: float) -> Recipe:
        """A copy of the loaded recipe with the value set (for the shares of the stage's mixture)."""
        out = copy.deepcopy(recipe)
        stage = out.stages[self.index]
        if self.source is None:
            stage.replay = Replay(ratio=value) if stage.replay is None else dataclasses.replace(stage.replay, ratio=value)
        else:
            for src in stage.sources:
                if src.name == self.source:
                    src.weight = value
        return out


@dataclass(frozen=True)
class Proxy:
    value: float
    steps: int
    tokens: int
    folder: Path

    @property
    def recipe_file(self) -> Path:
        return self.folder.with_suffix(".yaml")


def sweep_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "sweeps" / stage


def proxies(run_dir: Path, stage: str, knob: Knob, values: list[float], steps: list[int],
            tokens_per_step: int) -> list[Proxy]:
    root = sweep_dir(run_dir, stage)
    return [Proxy(v, n, n * tokens_per_step, root / knob.label(v) / f"{n}steps") for v in values for n in steps]


def proxy_raw(recipe: Recipe, knob: Knob, proxy: Proxy) -> dict:
    """The recipe of a proxy: stages 0..s with the value patched in and stage s cut to its tokens;
    no downstream tasks (held-out losses are what the law fits)."""
    raw = _prefix_raw(recipe, knob.index + 1)
    knob.patch(raw, proxy.value)
    raw["stages"][knob.index]["tokens"] = proxy.tokens
    return raw


def _prefix_raw(recipe: Recipe, stages: int) -> dict:
    raw = resolved_raw(recipe)  # absolute paths: the copy lives elsewhere than the recipe
    raw["stages"] = raw["stages"][:stages]
    raw.pop("evaluation", None)
    return raw


def train_base(recipe: Recipe, run_dir: Path, stage: str, index: int) -> Path | None:
    """Train the stages before the swept one once, in sweeps/NAME/base (None for the first stage)."""
    if index == 0:
        return None
    base = sweep_dir(run_dir, stage) / "base"
    _train(_prefix_raw(recipe, index), base.with_suffix(".yaml"), base, index - 1)
    return base


def run_proxy(recipe: Recipe, knob: Knob, proxy: Proxy, base: Path | None) -> bool:
    """Train a proxy unless it is finished; whether it trained now."""
    if finished(proxy.folder, recipe.stages[knob.index].name):
        return False
    if base is not None and not proxy.folder.exists() and int(os.environ.get("RANK", "0")) == 0:
        copy_run(base, proxy.folder)
    barrier()
    _train(proxy_raw(recipe, knob, proxy), proxy.recipe_file, proxy.folder, knob.index)
    return True


def finished(folder: Path, stage: str) -> bool:
    manifest = read_manifest(folder) if (folder / "run.json").is_file() else None
    done = manifest is not None and any(r.name == stage and r.status == "done" for r in manifest.stages)
    return done and bool(EvalFile(folder).doc.get("loss", {}).get(stage))


def losses(folder: Path, evaluation: str) -> dict[str, float]:
    """Held-out loss per domain of one evaluation (a stage's name, or "init") of a run folder."""
    return dict(EvalFile(folder).doc.get("loss", {}).get(evaluation, {}))


def copy_run(base: Path, out: Path) -> None:
    """Atomically make `out` a copy of the run folder `base` (its checkpoints hard-linked)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    for entry in base.iterdir():
        if entry.name == LOCK_FILE or entry.name.startswith("."):
            continue
        if entry.is_dir():
            link = entry.name in LINKED
            shutil.copytree(entry, tmp / entry.name, copy_function=_link if link else shutil.copy2)
        else:
            shutil.copy2(entry, tmp / entry.name)
    replace_dir(tmp, out)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links: a plain copy
        shutil.copy2(src, dst)


def _train(raw: dict, recipe_file: Path, run_dir: Path, last: int) -> None:
    """`strata train` on the recipe `raw` (written to `recipe_file`) in `run_dir`: the command's own
    parser and entry point, so that the proxies run exactly as a user's `strata train` does."""
    if finished(run_dir, raw["stages"][last]["name"]):
        return
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        write_text_atomic(recipe_file, yaml.safe_dump(raw, sort_keys=False))
    barrier()
    parser = argparse.ArgumentParser(prog="strata train")
    train.add_arguments(parser)
    code = train.run(parser.parse_args([str(recipe_file), "--run-dir", str(run_dir)]))
    if code != 0:
        stop = StrataError(f"{run_dir}: the proxy run stopped (exit {code}); run the same sweep again to resume it")
        stop.exit_code = code
        raise stop
