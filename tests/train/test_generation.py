"""Generative replay: the recipe key is validated by key path, the same seed writes the same text
(another seed other text), a generation killed half-way resumes to the very shards of one that
never stopped, and (one `strata train` subprocess, ~8 s on a quiet machine) a stage trains on its generated replay with distillation on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, TOKENIZER, small_corpus, strata

from pipeline.cli import main
from pipeline.errors import RecipeError
from pipeline.recipe.load import load_recipe
from pipeline.recipe.plan import build_plan
from pipeline.train import generation

RECIPE = """\
name: gen
seed: {seed}
tokenizer: {tokenizer}
model: {{init: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}}}
seq_len: 32
batch: {{micro: 2, global: 4}}
data: {{dir: {data}, heldout: 0.0}}
checkpoint: {{every: 0}}
train: {{eval_tokens: 64}}
stages:
  - name: english
    tokens: 256
    sources: [{{name: en, path: {en}}}]
    schedule: {{max_lr: 1.0e-3}}
  - name: german
    tokens: 256
    sources: [{{name: de, path: {de}}}]
    replay:
      ratio: 0.25
      generate: {{tokens: {tokens}, max_new_tokens: 12, batch: 3, temperature: 1.0, top_k: 50, model: {model}}}
    distill: {{teacher: previous, on: replay}}
    schedule: {{max_lr: 1.0e-3}}
"""


def write(tmp: Path, seed: int = 7, tokens: int = 96, model: str = "init", data: str = "data", **extra: str) -> Path:
    text = RECIPE.format(seed=seed, tokenizer=TOKENIZER, data=tmp / data, tokens=tokens, model=model,
                         en=small_corpus(tmp, "en", 8, chars=400), de=small_corpus(tmp, "de", 8, chars=400))
    for old, new in extra.items():
        text = text.replace(old, new)
    path = tmp / f"{data}.yaml"
    path.write_text(text)
    return path


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("block-*.arrow"))}


def test_generated_share_is_the_replay_share_without_from(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path))
    mixture = build_plan(recipe)[1].mixture
    assert [(c.source, c.share, c.replay_of) for c in mixture] == [("de", 0.75, None),
                                                                    ("generated-german", 0.25, "generated")]


def test_generate_keys_are_checked_by_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, model="german", **{"max_new_tokens: 12": "max_new_tokens: 12, prompts: missing.txt"})
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "stages[1].replay.generate.model: 'german' is this or a later stage" in str(e.value)
    assert "stages[1].replay.generate.prompts: is neither bos nor a file of prompts" in str(e.value)


def test_same_seed_same_text_other_seed_other_text(tmp_path: Path) -> None:
    for data, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert main(["generate", str(write(tmp_path, seed=seed, data=data)), "--stage", "german",
                     "--run-dir", str(tmp_path / "run")]) == 0
    a, b, c = (shard_bytes(tmp_path / d / "generated-german") for d in "abc")
    assert len(a) == 3 and a == b  # 96 tokens / 12 per sample = 8 samples, blocks of 3
    assert a != c
    manifest = json.loads((tmp_path / "a" / "generated-german" / "manifest.json").read_text())
    assert manifest["generation"]["settings"]["top_k"] == 50 and manifest["tokens"] > 0
    assert manifest["heldout"]["shards"] == []  # generated text is never an evaluated domain


def test_killed_generation_resumes_to_identical_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole, killed = write(tmp_path, data="whole"), write(tmp_path, data="killed")
    assert main(["generate", str(whole), "--stage", "german"]) == 0
    real_write, written = generation.write_block, []

    def dies_after_two(job, k, samples):
        if len(written) == 2:
            raise KeyboardInterrupt  # the process is killed while generating block 2
        real_write(job, k, samples)
        written.append(k)

    monkeypatch.setattr(generation, "write_block", dies_after_two)
    assert main(["generate", str(killed), "--stage", "german"]) == 130
    folder = tmp_path / "killed" / "generated-german"
    assert not (folder / "manifest.json").exists() and len(shard_bytes(folder)) == 2
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("block-*.arrow")}
    monkeypatch.setattr(generation, "write_block", real_write)
    assert main(["generate", str(killed), "--stage", "german"]) == 0
    assert shard_bytes(folder) == shard_bytes(tmp_path / "whole" / "generated-german")
    assert {n: (folder / n).stat().st_mtime_ns for n in kept} == kept  # finished blocks were kept, not redone
    fingerprints = [json.loads((tmp_path / d / "generated-german" / "manifest.json").read_text())["fingerprint"]
                    for d in ("whole", "killed")]
    assert fingerprints[0] == fingerprints[1]


def test_stage_trains_on_generated_replay_with_distillation(tmp_path: Path) -> None:
    recipe = write(tmp_path, model="previous")
    strata(["prepare", recipe, "--quiet"], cwd=REPO)
    run_dir = tmp_path / "run"
    proc = strata(["train", recipe, "--run-dir", run_dir])
    assert "generating replay text with" in proc.stdout
    manifest = json.loads((tmp_path / "data" / "generated-german" / "manifest.json").read_text())
    assert manifest["generation"]["model"]["path"].endswith("stages/01-english/hf")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    german = [r for r in rows if r.get("stage_name") == "german" and "kl" in r]
    assert german and all(r["kl"] >= 0 for r in german)
    assert any(r["kl"] > 0 for r in german)  # the student drifts from its teacher on the generated rows


def test_check_shows_the_generated_share_tokens_and_cost(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", str(write(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert re.search(r"generated-german +25.0% generated replay", out)
    assert "generated replay (not generated yet; 25.0% of the stage): 96 tokens in 8 samples of <= 12 tokens " \
           "(3 blocks of 3), temperature 1, top_p 1, top_k 50" in out
    assert "TFLOP of forward passes" in out
