"""One `strata prepare` per data dir (the tasks of one SLURM array together), and the temporaries of
killed writers removed by the next process that owns the folder: a prepare for the data dir, rank 0
of `strata train` for the run folder."""

from __future__ import annotations

import fcntl
from pathlib import Path

from conftest import TOKENIZER, small_corpus

from pipeline.cli import main
from pipeline.train.ownership import RunOwner

RECIPE = """\
name: locked
tokenizer: {tokenizer}
model: {{init: {{hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}}}
seq_len: 64
batch: {{micro: 2, global: 8}}
data: {{dir: {data}}}
stages:
  - name: general
    tokens: 4096
    sources: [{{name: en, path: {en}}}]
    schedule: {{max_lr: 1.0e-3}}
"""


def recipe(tmp: Path) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(RECIPE.format(tokenizer=TOKENIZER, data=tmp / "data", en=small_corpus(tmp, "en", 3)))
    return path


def test_a_second_prepare_on_a_data_dir_in_use_is_one_error_naming_it(tmp_path, capsys):
    path = recipe(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "prepare.lock", "a+") as held:  # another prepare, running
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("host h, pid 4242, since then\n")
        held.flush()
        assert main(["prepare", str(path), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert f"error: {data}: in use by another strata prepare" in err and "pid 4242" in err
        assert main(["prepare", str(path), "--quiet", "--num-shards", "2", "--shard-index", "1"]) == 1  # nor an array
        assert not (data / "en").exists()
    assert main(["prepare", str(path), "--quiet"]) == 0  # released: it runs
    assert (data / "en" / "manifest.json").is_file()


def test_prepare_removes_what_a_killed_prepare_or_finalizer_left(tmp_path, capsys):
    path = recipe(tmp_path)
    data = tmp_path / "data"
    left = [data / ".tmp-en-999999", data / ".tmp-other-source-12", data / ".old-en-77"]  # folders of a killed run
    for folder in left:
        (folder / "sub").mkdir(parents=True)
    (data / ".manifest.json.tmp-31337").write_text("{")  # a torn atomic write
    (data / ".parts-en").mkdir()  # an array's staged parts: kept
    assert main(["prepare", str(path), "--quiet"]) == 0
    assert not any(p.exists() for p in left) and not (data / ".manifest.json.tmp-31337").exists()
    assert (data / ".parts-en").is_dir() and (data / "en" / "manifest.json").is_file()
    assert f"removed {data / '.tmp-en-999999'}" in capsys.readouterr().out


def test_the_run_folder_owner_removes_a_killed_runs_temporaries(tmp_path):
    run = tmp_path / "run"
    export = run / "stages" / "01-general"
    export.mkdir(parents=True)
    (run / "checkpoints").mkdir()
    leftovers = [run / "checkpoints" / ".latest.json.tmp-4242", run / ".eval.json.tmp-17", run / ".run.json.tmp-9"]
    for f in leftovers:
        f.write_text("{")
    (export / ".hf.tmp-555").mkdir()
    kept = [run / "checkpoints" / ".tmp-stage01-step000002", run / ".eval.json.lock"]  # a save's folder; a lock
    kept[0].mkdir()
    kept[1].write_text("")
    owner = RunOwner(run)
    owner.claim()
    owner.release()
    assert not any(f.exists() for f in leftovers) and not (export / ".hf.tmp-555").exists()
    assert all(f.exists() for f in kept)
