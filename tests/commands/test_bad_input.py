"""Bad input never prints a traceback: every `strata` command, run through its entry point, on a
folder of bad inputs exits non-zero with one `error:` line that names the file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from conftest import REPO, demo_docs, prepared_recipe, recipe_dict, small_corpus, write_recipe
from safetensors.torch import save_file

from pipeline.cli import main


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A folder of bad inputs, each made the way a user makes it by mistake."""
    d = tmp_path_factory.mktemp("bad")
    good = recipe_dict(d, [{"name": "general", "tokens": 4096, "schedule": {"max_lr": 1e-3},
                            "sources": [{"name": "en", "path": str(small_corpus(d, "en", 3))}]}])
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)  # e.g. a .zst or a model given as the recipe
    text = yaml.safe_dump(good, sort_keys=False)
    (d / "dup.yaml").write_text(text.replace("seq_len: 64\n", "seq_len: 64\nseq_len: 128\n"))
    (d / "notes.txt").write_text("not a sentencepiece model\n")
    write_recipe(d, {**good, "tokenizer": str(d / "notes.txt")}, name="bad-tokenizer.yaml")
    (d / "empty").mkdir()
    run = d / "run-binary-recipe"  # a run folder whose recipe.yaml was overwritten
    run.mkdir()
    (run / "recipe.yaml").write_bytes(bytes(range(256)))
    stage_line = "- name: general\n"
    (d / "escape.yaml").write_text(text.replace(stage_line, "- name: ../../../../escaped\n"))
    (d / "source.yaml").write_text(text.replace("- name: en\n", "- name: ../en\n"))
    (d / "bogus.yaml").write_text(BOGUS_METRIC_TASK.format(data=REPO / "data_recipes/demo/tasks/continuation_en.jsonl"))
    (d / "bogus-metric.yaml").write_text(text + f"evaluation:\n  tasks: [{d / 'bogus.yaml'}]\n  limit: 2\n")
    (d / "tokenizer-only").mkdir()  # a folder, but not a model: what a wrong path in distill.teacher gives
    (d / "tokenizer-only" / "tokenizer_config.json").write_text("{}")
    teacher = {**good["stages"][0], "distill": {"teacher": str(d / "tokenizer-only")}}
    write_recipe(d, {**good, "stages": [teacher]}, name="teacher.yaml")
    truncated = d / "truncated-model"  # an export cut short by a full disk or a copy
    truncated.mkdir()
    (truncated / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(64, 64)}, truncated / "model.safetensors")
    whole = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(whole[:len(whole) // 2])
    write_recipe(d, {**good, "model": {"from_pretrained": str(truncated)}}, name="truncated.yaml")
    _run_with_truncated_export(d, good)
    saved = d / "saved"  # a dataset saved with datasets' save_to_disk, then copied in part
    datasets.Dataset.from_dict({"text": [r["text"] for r in demo_docs("en", 30)]}).save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:2000])
    hf = {**good["stages"][0], "sources": [{"name": "saved", "path": str(saved)}]}
    write_recipe(d, {**good, "stages": [hf]}, name="truncated-dataset.yaml")
    torn = d / "run-torn-manifest"
    torn.mkdir()
    (torn / "recipe.yaml").write_text(text)
    (torn / "run.json").write_text('{"recipe": "t", "world_size": 1, "stag')
    return d


def _run_with_truncated_export(d: Path, good: dict) -> None:
    """A finished run folder whose stage export lost half its weights after the stage recorded its
    checksums in run.json (a full disk during a copy, a torn rsync)."""
    from pipeline.recipe.load import load_recipe
    from pipeline.train.run_folder import open_run, read_manifest, save_manifest, stage_checksums

    (d / "h").mkdir()
    stage = {**good["stages"][0], "sources": [{"name": "en", "path": str(small_corpus(d / "h", "en", 12))}]}
    path = prepared_recipe(d / "h", {**good, "data": {"dir": str(d / "h" / "data"), "heldout": 0.4},
                                     "stages": [stage]})
    run = d / "run-truncated-export"
    open_run(run, load_recipe(path), 1)
    hf = run / "stages" / "01-general" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(64, 64)}, hf / "model.safetensors")
    manifest = read_manifest(run)
    manifest.stages[0].status, manifest.stages[0].files = "done", stage_checksums(run, 0, "general")
    save_manifest(run, manifest)
    weights = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(weights[:len(weights) // 2])


BOGUS_METRIC_TASK = """\
task: bogus_continuation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: bogus_metric_xyz, aggregation: mean, higher_is_better: true}}
"""

# (command line, what the error must name: the file, or several strings); {d} is the folder of bad inputs
CASES = [
    (["check", "{d}/binary.yaml"], "{d}/binary.yaml"),
    (["check", "{d}/dup.yaml"], "{d}/dup.yaml:{dup}: duplicate key 'seq_len' (first at line {first})"),
    (["check", "{d}/bad-tokenizer.yaml"], "{d}/notes.txt"),
    (["check", "{d}/missing.yaml"], "{d}/missing.yaml"),
    (["prepare", "{d}/dup.yaml"], "{d}/dup.yaml:{dup}: duplicate key"),
    (["train", "{d}/binary.yaml"], "{d}/binary.yaml"),
    (["train", "{d}/dup.yaml", "--dry-run"], "{d}/dup.yaml:{dup}: duplicate key"),
    (["score", "{d}/bad-tokenizer.yaml", "--stage", "general"], "{d}/notes.txt"),
    (["eval", "{d}/empty"], "{d}/empty"),
    (["eval", "{d}/run-binary-recipe"], "{d}/run-binary-recipe/recipe.yaml"),
    (["report", "{d}/empty"], "{d}/empty"),
    (["report", "{d}/run-torn-manifest"], "{d}/run-torn-manifest/run.json"),
    (["tokenizer", "train", "--input", "{d}/missing.jsonl", "--vocab-size", "300", "--out", "{d}/t.model"],
     "{d}/missing.jsonl"),
    (["tokenizer", "extend", "{d}/notes.txt", "--input", "{d}/notes.txt", "--add", "8", "--out", "{d}/t2.model"],
     "{d}/notes.txt"),
    (["expand", "{d}/empty", "--add-layers", "1", "--out", "{d}/grown"], "{d}/empty"),
    (["schema", "--out", "{d}/no/such/folder/schema.json"], "{d}/no/such/folder/schema.json"),
    (["check", "{d}/escape.yaml"], ("{d}/escape.yaml", "stages[0].name: must start with a letter or digit")),
    (["prepare", "{d}/source.yaml"], ("{d}/source.yaml", "stages[0].sources[0].name: must start")),
    (["check", "{d}/bogus-metric.yaml"], ("{d}/bogus-metric.yaml", "evaluation.tasks[0]: {d}/bogus.yaml: unknown metric 'bogus_metric_xyz'")),
    (["check", "{d}/teacher.yaml"], ("{d}/teacher.yaml", "stages[0].distill.teacher: not a Hugging Face model "
                                     "folder (no config.json): {d}/tokenizer-only")),
    (["check", "{d}/truncated.yaml"], ("{d}/truncated.yaml", "model.from_pretrained: {d}/truncated-model/"
                                       "model.safetensors: truncated")),
    (["prepare", "{d}/truncated-dataset.yaml"], ("{d}/saved/data-00000-of-00001.arrow: source 'saved': the saved "
                                                 "dataset cannot be read")),
    (["eval", "{d}/run-truncated-export"], "{d}/run-truncated-export/stages/01-general/hf/model.safetensors: "
                                           "differs from its checksum in run.json"),
]


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(a[:2]).replace("{d}/", "") for a, _ in CASES])
def test_every_command_on_bad_input_is_one_error_line_naming_the_file(bad, args, named, capsys):
    """In-process through `strata`'s entry point (`pipeline.cli.main`, what the console script
    calls): an exception it does not turn into one line would fail the test with its traceback.
    A fresh process per case cost two to five seconds of imports each; the read-only and full-disk
    cases below still run as separate processes."""
    lines = (bad / "dup.yaml").read_text().splitlines()
    first = lines.index("seq_len: 64") + 1
    capsys.readouterr()
    code = main([a.format(d=bad) for a in args])
    out, err = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in err + out, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    for part in (named,) if isinstance(named, str) else named:
        assert part.format(d=bad, dup=first + 1, first=first) in err, err[-3000:]


def read_only(folder: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`strata ARGS` with `folder` mounted read-only (a private mount namespace; needs root)."""
    return in_namespace(f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}", args)


def can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount(), reason="needs a private mount namespace (root) to make a read-only folder")
def test_a_run_folder_on_a_read_only_file_system_is_one_error_line(bad, tmp_path):
    recipe = yaml.safe_load((bad / "dup.yaml").read_text())  # (safe_load keeps the last seq_len)
    path = write_recipe(tmp_path, recipe)
    ro = tmp_path / "ro"
    ro.mkdir()
    for args, named in ((["train", path, "--run-dir", ro / "run"], f"{ro / 'run'}: cannot write to the run folder"),
                        (["prepare", path], None)):
        if named is None:  # the data folder is the read-only one
            recipe["data"]["dir"] = str(ro / "data")
            path = write_recipe(tmp_path, recipe)
            args = ["prepare", path]
            named = str(ro / "data")
        proc = read_only(ro, args)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and named in errors[0] and "Read-only file system" in errors[0], proc.stderr[-3000:]



def in_namespace(setup: str, args: list) -> subprocess.CompletedProcess:
    """`strata ARGS` after the shell commands `setup` (mounts) in a private mount namespace (needs root)."""
    import shlex
    import sys

    inner = f"{setup} && exec {sys.executable} -m pipeline {' '.join(shlex.quote(str(a)) for a in args)}"
    return subprocess.run(["unshare", "-m", "sh", "-c", inner], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not can_mount(), reason="needs a private mount namespace (root) to fill a small disk")
def test_a_full_disk_during_prepare_is_one_error_naming_the_source(bad, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    text = (bad / "h" / "recipe.yaml").read_text().replace(str(bad / "h" / "data"), str(full / "data"))
    (tmp_path / "r.yaml").write_text(text)
    proc = in_namespace(f"mount -t tmpfs -o size=4k none {full}", ["prepare", tmp_path / "r.yaml"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "source 'en': cannot prepare (No space left on device); free disk space" in errors[0]
    assert str(full / "data") in errors[0], errors
