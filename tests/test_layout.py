"""The tree shows the data flow: imports point one way (recipe -> data -> model -> train ->
evaluate -> commands -> cli), checked by import-linter's contract in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_imports_follow_the_data_flow():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([lint, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_a_back_edge_breaks_the_contract(tmp_path):
    """The contract is live: a data module importing the trainer is reported."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    mixer = copy / "pipeline" / "data" / "mixer.py"
    mixer.write_text(mixer.read_text() + "\nfrom pipeline.train import trainer  # noqa\n")
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([lint, "--config", str(copy / "pyproject.toml")], cwd=copy, capture_output=True, text=True,
                          env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "pipeline.data is not allowed to import pipeline.train" in proc.stdout
