"""A merging stage is evaluated twice: the merged model (the run's, in every CL metric) and its
trained weights before the merge (`loss_unmerged`), and the report shows what the merge bought.

No training: the run folder holds three tiny random models as the stage exports, so the test is
fast; the in-run path (the trainer scoring its module before the merge) is covered by the slow
merge test in tests/train/test_objectives.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prepared_recipe, recipe_dict, small_corpus

from pipeline.cli import main
from pipeline.commands.recipe_file import open_recipe
from pipeline.data.tokenizer import load_tokenizer
from pipeline.evaluate.heldout import domain_data, evaluate_domain, recipe_domains
from pipeline.model.build import build_model
from pipeline.train.run_folder import open_run, read_manifest, save_manifest, stage_dir


def merging_run(tmp_path):
    """English, then German merged with the model it started from; both stages 'done', three
    exports that differ: english/hf, german/hf-unmerged (trained) and german/hf (merged)."""
    sched = {"max_lr": 1e-3}
    stages = [{"name": "english", "tokens": 1024, "schedule": sched,
               "sources": [{"name": "en", "path": str(small_corpus(tmp_path, "en", 20, chars=600))}]},
              {"name": "german", "tokens": 1024, "schedule": sched,
               "sources": [{"name": "de", "path": str(small_corpus(tmp_path, "de", 20, chars=600))}],
               "merge": {"method": "linear", "weight": 0.5, "with": "previous"}}]
    raw = recipe_dict(tmp_path, stages, train={"eval_tokens": 256})
    raw["data"]["heldout"] = 0.3
    recipe = open_recipe(prepared_recipe(tmp_path, raw))
    run_dir = tmp_path / "run"
    manifest = open_run(run_dir, recipe, 1)
    for record in manifest.stages:
        record.status, record.steps = "done", 2
    save_manifest(run_dir, manifest)
    tok = load_tokenizer(recipe.tokenizer)
    models = {}
    for seed, (index, folder) in enumerate([(0, "hf"), (1, "hf-unmerged"), (1, "hf")]):
        model = build_model(recipe, tok.vocab_size, tok.eos_id)
        with torch.no_grad():  # a different model per export, as training would make
            torch.manual_seed(seed)
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        path = stage_dir(run_dir, index, recipe.stages[index].name) / folder
        model.save_pretrained(path)
        models[(index, folder)] = model.eval()
    return recipe, run_dir, models


def direct_loss(recipe, model) -> dict[str, float]:
    return {d.name: evaluate_domain(model, domain_data(recipe, d), recipe.seq_len, recipe.batch.micro)["loss"]
            for d in recipe_domains(recipe)}


def test_unmerged_model_is_evaluated_beside_the_merged_one_and_reported(tmp_path, capsys):
    recipe, run_dir, models = merging_run(tmp_path)
    assert main(["eval", str(run_dir)]) == 0
    assert "german (unmerged)" in capsys.readouterr().out
    doc = json.loads((run_dir / "eval.json").read_text())
    unmerged, merged = direct_loss(recipe, models[(1, "hf-unmerged")]), direct_loss(recipe, models[(1, "hf")])
    # only the merging stage has an unmerged entry, scored on every domain from hf-unmerged/
    assert list(doc["loss_unmerged"]) == ["german"] and list(doc["results_unmerged"]) == ["german"]
    assert doc["loss_unmerged"]["german"] == pytest.approx(unmerged, rel=1e-9)
    assert set(doc["results_unmerged"]["german"]["en"]) == {"loss", "perplexity", "accuracy", "tokens", "fingerprint"}
    # the run's own evaluation, and so every CL metric, stays on the merged model
    assert doc["loss"]["german"] == pytest.approx(merged, rel=1e-9)
    assert all(abs(unmerged[n] - merged[n]) > 1e-4 for n in merged)
    assert doc["metrics"]["loss"]["FGT"]["german"] == pytest.approx(doc["loss"]["german"]["en"] - doc["loss"]["english"]["en"])
    # nothing is scored twice
    before = (run_dir / "eval.json").read_text()
    assert main(["eval", str(run_dir)]) == 0
    assert "evaluated: nothing new" in capsys.readouterr().out
    assert (run_dir / "eval.json").read_text() == before
    # the report's table: per domain, unmerged, merged and the change, the domains' roles named
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    section = report.split("## What the merge bought")[1]
    for name, role in (("en", "earlier"), ("de", "this stage")):
        row = f"| german | {name} ({role}) | {unmerged[name]:.4f} | {merged[name]:.4f} | {merged[name] - unmerged[name]:+.4f} |"
        assert row in section
    assert "| english |" not in section


def test_a_lost_unmerged_export_is_one_clear_error(tmp_path, capsys):
    _, run_dir, _ = merging_run(tmp_path)
    manifest = read_manifest(run_dir)
    for f in (stage_dir(run_dir, 1, manifest.stages[1].name) / "hf-unmerged").iterdir():
        f.unlink()
    assert main(["eval", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "hf-unmerged" in err and "Traceback" not in err


def test_every_evaluation_the_trainer_can_be_handed_has_the_whole_stage_evaluation_interface():
    from pipeline.evaluate.harness import TaskEvaluation
    from pipeline.evaluate.heldout import RunEvaluation
    from pipeline.train.trainer import StageEvaluation

    wanted = [n for n in vars(StageEvaluation) if not n.startswith("_")]
    assert "evaluate_unmerged" in wanted
    for cls in (RunEvaluation, TaskEvaluation):
        assert all(callable(getattr(cls, n, None)) for n in wanted), (cls, wanted)
