"""A stage with a new tokenizer: an extension of the demo tokenizer with German pieces.

The recipe trains English, then German under the extended tokenizer with English replayed. It
checks that `strata prepare` writes shards for both tokenizers, that the German stage reads new
ids, that the model grows its embeddings exactly at the boundary, that the stage's export ships
the new tokenizer, and that a run killed inside the German stage resumes to the same numbers.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TOKENIZER, demo_docs, prepared_recipe, recipe_dict, small_corpus, step_metrics, strata

from pipeline.cli import main
from pipeline.data.shards import read_source_manifest, source_folder
from pipeline.data.tokenizer import check_tokenizers, extend_sentencepiece, load_tokenizer
from pipeline.errors import RecipeError
from pipeline.recipe.load import load_recipe, parse_recipe

REQUEST = 200  # German pieces asked for; the small corpus yields fewer (the demo tokenizer knows German)
STEPS = (3, 4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab")
    ext = extend_sentencepiece(TOKENIZER, [d["text"] for d in demo_docs("de", 60)], REQUEST, tmp / "de.model")
    assert ext.added >= 50
    en, de = small_corpus(tmp, "en", 12), small_corpus(tmp, "de", 40, chars=3000)
    sched = {"warmup": 1, "max_lr": 3e-3, "min_lr": 3e-4}
    raw = recipe_dict(tmp, [
        {"name": "general", "tokens": 8 * 64 * STEPS[0], "sources": [{"name": "en", "path": str(en)}],
         "schedule": sched},
        {"name": "german", "tokens": 8 * 64 * STEPS[1], "sources": [{"name": "de", "path": str(de)}],
         "tokenizer": str(ext.out), "replay": {"ratio": 0.25}, "schedule": sched},
    ], checkpoint={"every": 2, "keep": 2}, deepspeed={"zero_stage": 1}, data={"dir": str(tmp / "data"), "heldout": 0.1})
    path = prepared_recipe(tmp, raw)
    return path, ext.out, ext.added


def test_prepare_writes_shards_for_every_tokenizer(setup):
    path, new, add = setup
    recipe = load_recipe(path)
    digest = load_tokenizer(new).content_hash[:8]
    for name in ("en", "de"):
        base, other = source_folder(recipe, name), source_folder(recipe, name, str(new))
        assert base.name == name and other.name == f"{name}@{digest}"
        assert read_source_manifest(base)["tokenizer"]["vocab_size"] == 8000
        assert read_source_manifest(other)["tokenizer"]["vocab_size"] == 8000 + add
    # German encodes in fewer tokens with the extension; the prepared token counts show it.
    assert read_source_manifest(source_folder(recipe, "de", str(new)))["tokens"] < read_source_manifest(source_folder(recipe, "de"))["tokens"]


def test_stage_stream_reads_new_ids_and_carries_replay_cursors_proportionally(setup):
    from pipeline.data.stream import StageStream
    from pipeline.train.scoring import carried_state

    path, new, add = setup
    recipe = load_recipe(path)
    carried = carried_state(recipe, 1)  # the stream state at the end of stage 1 (English, old tokenizer)
    stream = StageStream(recipe, 1, carried=carried)
    for s in stream.sources:  # own and replayed components both come from the new tokenizer's shards
        assert s.fingerprint == read_source_manifest(source_folder(recipe, s.name, str(new)))["fingerprint"]
    old_en, new_en = read_source_manifest(source_folder(recipe, "en")), read_source_manifest(source_folder(recipe, "en", str(new)))
    before = carried["cursors"]["en"]
    after = before * (new_en["tokens"] + new_en["documents"]) // (old_en["tokens"] + old_en["documents"])
    assert before > 0 and stream.retokenized["en"]["cursor"] == [before, after]
    assert stream.stage_start["en"] == after
    ids = torch.cat([b["input_ids"] for b in stream])
    assert int(ids.max()) >= 8000 and int(ids.max()) < 8000 + add
    assert stream.state_dict()["retokenized"]["en"]["cursor"] == [before, after]


def test_check_reports_the_vocabulary_change_and_the_saving(setup, capsys):
    path, _, add = setup
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "tokenizer:" in line)
    assert f"tokenizer: 8000 -> {8000 + add} pieces" in line and "saves" in line and "on de" in line
    saving = float(line.split("saves ")[1].split("%")[0])
    assert saving > 0


def test_a_stage_tokenizer_that_changes_an_existing_id_is_refused(setup, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    path, new, add = setup
    proto = pb.ModelProto()
    proto.ParseFromString(new.read_bytes())
    proto.pieces[1000].piece, proto.pieces[1001].piece = proto.pieces[1001].piece, proto.pieces[1000].piece
    bad = tmp_path / "bad.model"
    bad.write_bytes(proto.SerializeToString())
    import yaml

    raw = yaml.safe_load(path.read_text())
    raw["stages"][1]["tokenizer"] = str(bad)
    recipe = parse_recipe(raw, "t.yaml", tmp_path)  # the file alone is fine; its tokenizers are not
    with pytest.raises(RecipeError, match=r"stages\[1\]\.tokenizer: changes id 1000"):
        check_tokenizers(recipe)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    proc = strata(["check", tmp_path / "r.yaml"], expect=2)  # every command opens the recipe this way
    assert "stages[1].tokenizer: changes id 1000" in proc.stderr and "Traceback" not in proc.stderr


def test_new_pieces_with_frozen_embeddings_are_refused(setup, tmp_path):
    import yaml

    path, _, _ = setup
    raw = yaml.safe_load(path.read_text())
    raw["stages"][1]["expand"] = {"method": "llama_pro", "add_layers": 2, "freeze_old": True}
    with pytest.raises(RecipeError, match=r"stages\[1\]\.expand\.freeze_old: must be false"):
        parse_recipe(raw, "t.yaml", tmp_path)
    raw["stages"][1]["expand"]["freeze_old"] = False
    parse_recipe(raw, "t.yaml", tmp_path)


# ---------------------------------------------------------------------------------------------
# Training across the vocabulary change.


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):

    run_dir = tmp_path_factory.mktemp("vocab-run") / "run"
    proc = strata(["train", setup[0], "--run-dir", run_dir])
    return run_dir, proc.stdout


@pytest.mark.slow
def test_training_grows_the_embeddings_and_exports_the_new_tokenizer(setup, trained):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.model.expand import build_stage_model

    path, new, add = setup
    run_dir, stdout = trained
    assert f"embeddings resized for the stage tokenizer: 8000 -> {8000 + add} rows" in stdout
    assert "source 'en' re-tokenized" in stdout
    assert [(r["stage"], r["step"]) for r in step_metrics(run_dir)][-1] == (1, STEPS[1])
    # The model the German stage starts from: stage 1's rows kept bit for bit, new rows at their mean.
    recipe = load_recipe(path)
    end1 = load_file(run_dir / "stages" / "01-general" / "hf" / "model.safetensors")
    model, _ = build_stage_model(recipe, 1, 8000, 2, run_dir / "stages" / "01-general" / "hf")
    for name, grown in (("model.embed_tokens.weight", model.model.embed_tokens.weight),
                        ("lm_head.weight", model.lm_head.weight)):
        old = end1[name]
        assert grown.shape == (8000 + add, old.shape[1])
        assert torch.equal(grown[:8000], old)
        assert torch.equal(grown[8000:], old.double().mean(0).float().expand(add, -1))
    hf = run_dir / "stages" / "02-german" / "hf"
    exported = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True)
    assert exported.config.vocab_size == 8000 + add
    assert exported.get_input_embeddings().weight.shape[0] == 8000 + add
    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    assert len(tok) == 8000 + add
    assert tok.convert_ids_to_tokens(8000 + add - 1) == load_tokenizer(new).pieces()[-1]
    # Evaluation after the German stage read the new tokenizer's shards; the initial model the old.
    results = json.loads((run_dir / "eval.json").read_text())["results"]
    from pipeline.evaluate.heldout import Domain, domain_data

    for domain in ("en", "de"):
        d = Domain(domain, 0 if domain == "en" else 1, ("heldout",))
        assert results["german"][domain]["fingerprint"] == domain_data(recipe, d, str(new)).fingerprint
        assert results["init"][domain]["fingerprint"] == domain_data(recipe, d).fingerprint


@pytest.mark.slow
def test_resume_inside_the_new_tokenizer_stage_matches_uninterrupted_run(setup, trained, tmp_path):

    reference, _ = trained
    run_dir = tmp_path / "run"
    strata(["train", setup[0], "--run-dir", run_dir], fault="kill@2:3", expect="killed")  # last checkpoint: stage 2, step 2
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"] == "s02-step000002"
    proc = strata(["train", setup[0], "--run-dir", run_dir])
    assert "resuming at step 2 from s02-step000002" in proc.stdout
    assert step_metrics(run_dir) == step_metrics(reference)
