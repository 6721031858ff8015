"""A Trainer is built in a test, in-process: opening the run (lock, launcher watch, process group)
is `open_training`, a context around it, not its constructor."""

from __future__ import annotations

import json

import pytest
from conftest import TOKENIZER, group_of_one, small_corpus

from pipeline.cli import main
from pipeline.recipe.load import load_recipe
from pipeline.train.ownership import RunOwner, RunOwnershipLost
from pipeline.train.trainer import Trainer, open_training


def test_a_trainer_built_in_process_trains_a_stage_and_the_run_lock_is_the_contexts(tmp_path):
    en = small_corpus(tmp_path, "en", 8)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""\
name: in-process
tokenizer: {TOKENIZER}
model:
  init: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
seq_len: 32
batch: {{micro: 2, global: 4}}
data: {{dir: {tmp_path / 'data'}}}
checkpoint: {{every: 0}}
stages:
  - name: general
    tokens: 256
    sources: [{{name: en, path: {en}}}]
    schedule: {{max_lr: 1.0e-3}}
""")
    assert main(["prepare", str(path), "--quiet"]) == 0
    recipe, run_dir = load_recipe(path), tmp_path / "run"
    with group_of_one():  # the process group of one sets RANK, WORLD_SIZE, ...: undone after
        with open_training(recipe, run_dir) as run:
            trainer = Trainer(recipe, run_dir, run)  # no lock of its own: the context holds it
            try:
                losses = trainer.train()
            finally:
                trainer.close()
            with pytest.raises(RunOwnershipLost, match="in use by another strata train"):
                RunOwner(run_dir).claim()  # still locked inside the block
        after = RunOwner(run_dir)
        after.claim()  # released when the block ends
        after.release()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and losses["general"] == rows[-1]["loss"]
    assert (run_dir / "stages" / "01-general" / "hf" / "config.json").is_file()
