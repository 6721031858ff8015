"""The run folder's arithmetic and paths, each computed in one place."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.train.checkpoint import StageState
from pipeline.train.run_folder import export_dir, step_offsets


def test_step_offsets_are_the_steps_of_the_stages_before_then_the_total():
    assert step_offsets([3, None, 2]) == [0, 3, 3, 5]  # a stage not sized yet counts 0
    assert step_offsets([]) == [0]


def test_export_dir_is_stages_nn_name_hf():
    assert export_dir(Path("runs/x"), 1, "code") == Path("runs/x/stages/02-code/hf")


def test_stage_state_travels_as_plain_data_that_torch_loads_with_weights_only(tmp_path):
    state = StageState(1, 4, 2048, {"samples": 32, "cursors": {"en": 7}}, carried={"samples": 8})
    torch.save({"strata": state.as_dict()}, tmp_path / "client.pt")
    loaded = torch.load(tmp_path / "client.pt", weights_only=True)["strata"]
    assert StageState.from_dict(loaded) == state
    assert json.loads(json.dumps(state.as_dict())) == state.as_dict()
