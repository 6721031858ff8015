"""`strata sweep` end to end on a tiny two-stage recipe: the proxies are normal runs under
RUN_DIR/sweeps/NAME, a killed sweep resumes without redoing finished proxies, and plan.json holds
predicted[ratio][domain] and the recommended ratio."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

import pytest
import yaml
from conftest import TOKENIZER, small_corpus, strata

from pipeline.cli import main
from pipeline.distributed import leave
from pipeline.recipe.load import load_recipe

RECIPE = """\
name: sweep-test
seed: 7
tokenizer: {tokenizer}
model:
  init: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
seq_len: 64
batch: {{micro: 4, global: 8}}
data: {{dir: {data}, heldout: 0.1}}
checkpoint: {{every: 1, keep: 1}}
train: {{eval_tokens: 256}}
stages:
  - name: english
    tokens: 1024
    sources: [{{name: en, path: {en}}}]
    schedule: {{warmup: 1, max_lr: 3.0e-3, min_lr: 3.0e-4}}
  - name: german
    tokens: 10240
    sources: [{{name: de, path: {de}}}]
    replay: {{ratio: 0.25}}
    schedule: {{warmup: 1, max_lr: 3.0e-3, min_lr: 3.0e-4}}
"""
SWEEP = ["--stage", "german", "--replay", "0,0.5", "--fractions", "0.05,0.1,0.15", "--budget", "0.6",
         "--bootstrap", "10"]  # 20 steps at full budget: proxies of 1, 2 and 3 steps at two ratios


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    """A sweep killed during its second proxy (after that proxy's step 2), then run again in-process."""
    tmp = tmp_path_factory.mktemp("sweep")
    text = RECIPE.format(tokenizer=TOKENIZER, data=tmp / "data", en=small_corpus(tmp, "en", 12, 1200),
                         de=small_corpus(tmp, "de", 12, 1200))
    recipe = tmp / "recipe.yaml"
    recipe.write_text(text)
    assert main(["prepare", str(recipe), "--quiet"]) == 0
    run_dir = tmp / "run"
    args = ["sweep", recipe, *SWEEP, "--run-dir", run_dir]
    killed = strata(args, fault="kill@2:2", expect="killed")
    root = run_dir / "sweeps" / "german"
    first = (root / "0" / "1steps" / "metrics.jsonl").read_bytes()
    base = (root / "base" / "metrics.jsonl").read_bytes()
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                          "MASTER_PORT")}
    out = io.StringIO()
    try:  # in-process: the rendezvous variables the trainer sets and its process group are undone after
        with redirect_stdout(out):
            code = main([str(a) for a in args] + ["--write"])
    finally:
        leave()  # through DeepSpeed, which caches the group
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return {"tmp": tmp, "recipe": recipe, "root": root, "code": code, "out": out.getvalue(), "killed": killed,
            "first": first, "base": base}


def test_a_killed_sweep_resumes_without_redoing_finished_proxies(swept):
    root, out = swept["root"], swept["out"]
    assert swept["code"] == 0, out
    assert "proxy 0 x 1 steps: finished before" in out
    assert (root / "0" / "1steps" / "metrics.jsonl").read_bytes() == swept["first"]  # not run again
    assert (root / "base" / "metrics.jsonl").read_bytes() == swept["base"]  # the stages before, trained once
    rows = [json.loads(line) for line in (root / "0" / "2steps" / "metrics.jsonl").read_text().splitlines()]
    german = [r["step"] for r in rows if r["stage"] == 1]
    assert german == [1, 2]  # the killed proxy resumed from its checkpoint: no step trained twice
    for value in ("0", "0.5"):
        for steps in (1, 2, 3):
            run = yaml.safe_load((root / value / f"{steps}steps.yaml").read_text())
            assert run["stages"][1]["tokens"] == steps * 8 * 64
            assert run["stages"][1]["replay"]["ratio"] == float(value)
            assert "german" in json.loads((root / value / f"{steps}steps" / "eval.json").read_text())["loss"]


def test_the_plan_predicts_every_domain_at_every_ratio_and_recommends_one(swept):
    plan = json.loads((swept["root"] / "plan.json").read_text())
    assert set(plan["domains"]) == {"en", "de"} and plan["domains"]["de"] == "new"
    assert set(plan["predicted"]["0"]) == {"en", "de"} and set(plan["predicted"]["0.5"]) == {"en", "de"}
    assert 0 <= plan["recommended"] <= 0.5 and f"{plan['recommended']:g}" in plan["predicted"]
    assert plan["patch"] == {"stages[1].replay.ratio": plan["recommended"]}
    assert len(plan["measured"]) == 6 and (swept["root"] / "plan.png").stat().st_size > 0
    assert "<- recommended" in swept["out"] and "6 proxies of 1, 2, 3 steps = 60.0% of one full run" in swept["out"]
    patched = load_recipe(swept["tmp"] / "recipe.german-sweep.yaml")
    assert patched.stages[1].replay.ratio == plan["recommended"]


def test_the_proxies_compute_is_printed_and_checked_before_anything_trains(tmp_path, capsys, swept):
    code = main(["sweep", str(swept["recipe"]), "--stage", "german", "--replay", "0,0.5", "--fractions",
                 "0.05,0.1,0.15", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr()
    assert code == 2 and "60.0% of one full run" in err.out
    assert "--budget: the proxies need 60.0% of a full run, more than 30%" in err.err
    assert not (tmp_path / "r").exists()
    assert main(["sweep", str(swept["recipe"]), "--stage", "dutch"]) == 2
    assert "--stage: " in capsys.readouterr().err


TWO_SOURCES = """\
name: weights
tokenizer: {tokenizer}
model: {{init: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}}}
seq_len: 64
batch: {{micro: 4, global: 8}}
stages:
  - {{name: english, tokens: 1024, sources: [{{name: en, path: {en}}}], schedule: {{max_lr: 1.0e-3}}}}
  - name: mixed
    tokens: 4096
    schedule: {{max_lr: 1.0e-3}}
    sources: [{{name: de, path: {de}}}, {{name: py, path: {py}, weight: 1.0}}]
    replay: {{ratio: 0.2, from: [english]}}
"""


def test_a_weight_sweep_moves_one_sources_share_and_a_replay_sweep_the_replayed_share(tmp_path, capsys):
    from pipeline.commands.sweep_runs import Knob
    from pipeline.recipe.plan import stage_mixture

    path = tmp_path / "recipe.yaml"
    path.write_text(TWO_SOURCES.format(tokenizer=TOKENIZER, en=small_corpus(tmp_path, "en", 2),
                                       de=small_corpus(tmp_path, "de", 2), py=small_corpus(tmp_path, "code", 2)))
    recipe = load_recipe(path)
    shares = {c.source: c.share for c in stage_mixture(Knob(1, "py").apply(recipe, 3.0), 1)}
    assert shares == pytest.approx({"de": 0.2, "py": 0.6, "en": 0.2})  # (1 - 0.2) * 3/4 for py
    shares = {c.source: c.share for c in stage_mixture(Knob(1).apply(recipe, 0.5), 1)}
    assert shares == pytest.approx({"de": 0.25, "py": 0.25, "en": 0.5})
    assert recipe.stages[1].replay.ratio == 0.2  # the loaded recipe is left as it was
    assert Knob(1, "py").key(recipe) == "stages[1].sources[1].weight"
    for bad, message in ((["--weights", "fr=1,2"], "--weights: stage 'mixed' has no source 'fr' (it has de, py)"),
                         (["--weights", "py=1,x"], "--weights: not a comma-separated list of numbers"),
                         (["--replay", "0,1"], "--replay: ratios must be in [0, 1)"),
                         (["--tolerance", "-0.1"], "--tolerance: must be >= 0, got -0.1"),
                         (["--budget", "0"], "--budget: must be > 0, got 0")):
        assert main(["sweep", str(path), "--stage", "mixed", *bad]) == 2
        assert message in capsys.readouterr().err
