"""What a plain `pip install strata-cpt` brings: everything the commands need, plots included."""

from __future__ import annotations

import tomllib
from conftest import REPO


def test_plots_are_part_of_the_product_not_an_extra():
    """`strata report` draws PNGs; without matplotlib it died with ModuleNotFoundError, because
    matplotlib was only in a `plots` extra. It is a runtime dependency now."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip().lower() for dep in project["dependencies"]}
    assert {"matplotlib", "jinja2", "peft"} <= names
    assert "plots" not in project.get("optional-dependencies", {})


def test_torch_stays_a_range_so_gpu_users_get_their_cuda_build():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [torch] = [d for d in project["dependencies"] if d.startswith("torch")]
    assert "==" not in torch and ">=" in torch
