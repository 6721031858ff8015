"""A full disk during a checkpoint, as torch's own writer meets it: its C++ stream raises a
RuntimeError (not an OSError) after part of the checkpoint folder exists. The run stops with one
error line, the partial `.tmp-*` folder is gone (it would keep the disk full) and the last good
checkpoint resumes."""

from __future__ import annotations

import json

import pytest
from conftest import strata
from test_failures import error_lines, latest, recipe  # noqa: F401  (fixture)


@pytest.mark.slow
def test_torch_writer_failing_on_a_full_disk_is_one_error_and_the_last_checkpoint_resumes(recipe, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    proc = strata(["train", recipe, "--run-dir", run_dir], fault="torch-disk-full@s01-end", expect=1)
    [error] = error_lines(proc)
    assert "s01-end: cannot write the checkpoint (the write failed, is the disk full? torch: " in error
    assert "the last good checkpoint s01-step000002 is intact" in error
    assert latest(run_dir) == "s01-step000002"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    proc = strata(["train", recipe, "--run-dir", run_dir])
    assert "resuming at step 2 from s01-step000002" in proc.stdout
    assert json.loads((run_dir / "run.json").read_text())["stages"][1]["status"] == "done"
