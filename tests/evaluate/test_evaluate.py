"""Per-domain evaluation, eval.json, `strata eval` and `strata report` on a real 2-stage run.

One 2-process run (torchrun, CPU) trains `general` (en) then `code` (py) and evaluates the initial
model and each stage in-run on three domains: en and py held out, and de, an `eval:` set never
trained on. `strata eval` in one process must reproduce those numbers exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
from conftest import general_then_code, recipe_dict, small_corpus, strata, write_recipe

from pipeline.cli import main
from pipeline.errors import RecipeError, StrataError
from pipeline.evaluate.metrics import cl_metrics
from pipeline.recipe.load import parse_recipe

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVAL_TOKENS = 1024  # per domain (train.eval_tokens): every domain holds more, so each is cut to this


def eval_recipe(tmp, **overrides) -> dict:
    de = small_corpus(tmp, "de", 6)
    raw = recipe_dict(tmp, general_then_code(tmp, (4, 3), docs=20), eval=[{"name": "de", "path": str(de)}], checkpoint={"every": 0}, **{"train": {"eval_tokens": EVAL_TOKENS},
                                                                         **overrides})
    raw["data"]["heldout"] = 0.2
    return raw


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    recipe = write_recipe(tmp, eval_recipe(tmp))
    assert main(["prepare", str(recipe), "--quiet"]) == 0
    run_dir = tmp / "run"
    strata(["train", recipe, "--run-dir", run_dir], nproc=2)
    return run_dir


def test_eval_json_has_every_domain_after_every_stage_and_consistent_metrics(run):
    doc = json.loads((run / "eval.json").read_text())
    assert doc["version"] == 1 and doc["evaluations"] == ["init", "general", "code"]
    assert [(d["name"], d["stage"], d["stage_index"], d["kind"]) for d in doc["domains"]] == [
        ("en", "general", 0, "heldout"), ("py", "code", 1, "heldout"), ("de", None, None, "eval")]
    for evaluation in doc["evaluations"]:
        assert set(doc["results"][evaluation]) == {"en", "py", "de"}
        for d in doc["domains"]:
            r = doc["results"][evaluation][d["name"]]
            assert set(r) == {"loss", "perplexity", "accuracy", "tokens", "fingerprint"}
            assert r["tokens"] == d["tokens"] == EVAL_TOKENS
            assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
            assert 0.0 <= r["accuracy"] <= 1.0
            for measure in ("loss", "perplexity", "accuracy"):
                assert doc[measure][evaluation][d["name"]] == r[measure]
    loss = doc["loss"]
    assert loss["init"]["en"] == pytest.approx(math.log(8000), abs=0.5)  # an untrained model: ~uniform over 8k pieces
    assert loss["general"]["en"] < loss["init"]["en"] - 0.1  # the stage learned its domain
    # The stored metrics are the formulas of pipeline.evaluate.metrics applied to the stored matrix.
    names = [d["name"] for d in doc["domains"]]
    stage_of = [d["stage_index"] for d in doc["domains"]]
    for measure, higher in (("loss", False), ("accuracy", True)):
        matrix = [[doc[measure][s][n] for n in names] for s in ("general", "code")]
        want = cl_metrics(matrix, stage_of, higher, initial=[doc[measure]["init"][n] for n in names])
        assert doc["metrics"][measure] == {k: dict(zip(["general", "code"], v)) for k, v in want.items()}
    assert doc["metrics"]["loss"]["FGT"]["code"] == pytest.approx(loss["code"]["en"] - loss["general"]["en"])
    assert doc["metrics"]["loss"]["FWD"]["code"] == pytest.approx(loss["init"]["py"] - loss["general"]["py"])


def test_strata_eval_in_one_process_reproduces_the_two_process_run_exactly(run, tmp_path, capsys):
    """Deterministic, and independent of the world size: the in-run evaluation (2 ranks, the live
    DeepSpeed model) and `strata eval` (1 process, the stage exports) agree to the last bit."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "eval.json").unlink()
    assert main(["eval", str(copy)]) == 0
    assert "evaluated: init, general, code" in capsys.readouterr().out
    got, want = (json.loads((d / "eval.json").read_text()) for d in (copy, run))
    for key in ("results", "loss", "perplexity", "accuracy", "metrics"):
        assert got[key] == want[key], key


def test_strata_eval_fills_in_a_missing_stage_and_never_redoes_one(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    doc = json.loads((copy / "eval.json").read_text())
    doc["results"]["init"]["en"]["loss"] = 123.0  # a marker: must survive, since init is not redone
    del doc["results"]["code"]
    (copy / "eval.json").write_text(json.dumps(doc))
    assert main(["eval", str(copy)]) == 0
    assert "evaluated: code " in capsys.readouterr().out
    filled = json.loads((copy / "eval.json").read_text())
    assert filled["results"]["init"]["en"]["loss"] == 123.0
    assert filled["results"]["code"] == json.loads((run / "eval.json").read_text())["results"]["code"]
    before = (copy / "eval.json").read_bytes()
    assert main(["eval", str(copy)]) == 0
    assert "evaluated: nothing new" in capsys.readouterr().out
    assert (copy / "eval.json").read_bytes() == before


def test_report_renders_for_a_two_stage_run_with_valid_pngs(run, tmp_path, capsys):
    from matplotlib import image
    from PIL import Image

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "report.md")
    text = (copy / "report.md").read_text()
    for png in ("loss.png", "lr.png", "forgetting.png", "domain_loss.png"):
        path = copy / png
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, png
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.size[0] >= 400 and im.size[1] >= 200
        pixels = image.imread(path)
        assert pixels.std() > 0.01, f"{png} is blank"
        assert f"]({png})" in text
    for heading in ("## Stages", "## Held-out evaluation", "## Continual-learning metrics", "## Replay"):
        assert heading in text
    assert "| code |" in text and "de (eval set)" in text and "| after stage | AA | AIA | FGT | BWT | FWD |" in text


def test_an_eval_set_shares_the_source_namespace(tmp_path):
    raw = eval_recipe(tmp_path)
    raw["eval"][0]["name"] = "en"
    with pytest.raises(RecipeError, match=r"eval\[0\]\.name: duplicate source name 'en'"):
        parse_recipe(raw, "r.yaml", tmp_path)


def test_wandb_is_optional_and_respects_offline_mode(tmp_path, monkeypatch):
    from pipeline.train.sinks import log_scalars, open_wandb

    recipe = parse_recipe(eval_recipe(tmp_path, train={"wandb": True}), "r.yaml", tmp_path)
    try:
        import wandb  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "wandb", None)
        with pytest.raises(StrataError, match="train.wandb is set but wandb is not installed"):
            open_wandb(recipe, tmp_path)
        return
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wb = open_wandb(recipe, tmp_path)
    log_scalars(None, wb, {"loss": 1.0, "lr": 0.1, "grad_norm": None}, 1)
    wb.finish()
    assert (tmp_path / "wandb").is_dir() and list((tmp_path / "wandb").glob("offline-run-*"))
