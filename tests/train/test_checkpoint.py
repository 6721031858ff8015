"""StageCheckpoint: the pointer moves last, torn writes leave the last good checkpoint, retention.

A small stand-in engine keeps these tests fast; tests/test_trainer.py covers real DeepSpeed
checkpoints end to end (including resuming from one after SIGKILL).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ResumeError
from pipeline.train.checkpoint import (
    LATEST,
    Pointer,
    StageCheckpoint,
    end_tag,
    mid_tag,
    rng_state,
    set_rng_state,
    start_stage_rng,
)


class Crash(Exception):
    pass


class FakeEngine:
    """Writes a model-states file like DeepSpeed's engine, optionally dying half way."""

    def __init__(self, weight: float, crash: bool = False):
        self.weight = weight
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # Strata owns the pointer; DeepSpeed's own 'latest' is not used
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.tensor(self.weight)}, **client_state}, folder / "mp_rank_00_model_states.pt")
        if self.crash:
            (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 10)  # torn file
            raise Crash("killed while writing")

    def load_checkpoint(self, load_dir, tag, **kwargs):
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        state = torch.load(path, weights_only=True)
        self.weight = float(state.pop("module")["w"])
        return str(path), state


def pointer(tag: str, stage: int, step: int, done: bool = False, world: int = 1, zero: int = 1) -> Pointer:
    return Pointer(tag, stage, step, done, world, zero)


def test_tags_name_stage_and_step():
    assert mid_tag(0, 50) == "s01-step000050"
    assert end_tag(1) == "s02-end"


def test_save_then_load_round_trips_weights_and_state(tmp_path):
    ckpt = StageCheckpoint(tmp_path, keep=2)
    assert ckpt.latest() is None
    ckpt.save(FakeEngine(1.5), pointer(mid_tag(0, 2), 0, 2), {"step": 2, "stream": {"samples": 16}})
    assert ckpt.latest() == pointer("s01-step000002", 0, 2)
    engine = FakeEngine(0.0)
    state = ckpt.load(engine, ckpt.latest().tag)
    assert engine.weight == 1.5 and state == {"step": 2, "stream": {"samples": 16}}


def test_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    ckpt = StageCheckpoint(tmp_path, keep=2)
    ckpt.save(FakeEngine(1.0), pointer(mid_tag(0, 2), 0, 2), {"step": 2})
    with pytest.raises(Crash):
        ckpt.save(FakeEngine(2.0, crash=True), pointer(mid_tag(0, 4), 0, 4), {"step": 4})
    assert not (tmp_path / "s01-step000004").exists()  # the torn write never got its final name
    assert ckpt.latest().tag == "s01-step000002"
    engine = FakeEngine(0.0)
    assert ckpt.load(engine, ckpt.latest().tag) == {"step": 2} and engine.weight == 1.0
    # The next save of that step (after a resume) succeeds and cleans the torn folder up.
    ckpt.save(FakeEngine(2.0), pointer(mid_tag(0, 4), 0, 4), {"step": 4})
    assert ckpt.latest().tag == "s01-step000004"
    assert not list(tmp_path.glob(".tmp-*"))


def test_complete_folder_without_moved_pointer_is_ignored(tmp_path):
    """A crash between the folder rename and the pointer write: resume uses the older pointer."""
    ckpt = StageCheckpoint(tmp_path, keep=2)
    ckpt.save(FakeEngine(1.0), pointer(mid_tag(0, 2), 0, 2), {"step": 2})
    before = (tmp_path / LATEST).read_text()
    ckpt.save(FakeEngine(2.0), pointer(mid_tag(0, 4), 0, 4), {"step": 4})
    (tmp_path / LATEST).write_text(before)  # as if the process died before os.replace of the pointer
    assert ckpt.latest().tag == "s01-step000002"
    ckpt.save(FakeEngine(3.0), pointer(mid_tag(0, 4), 0, 4), {"step": 4})  # overwrites the orphan
    engine = FakeEngine(0.0)
    ckpt.load(engine, "s01-step000004")
    assert engine.weight == 3.0


def test_keeps_last_k_mid_stage_tags_and_every_stage_end(tmp_path):
    ckpt = StageCheckpoint(tmp_path, keep=2)
    for step in (2, 4, 6):
        ckpt.save(FakeEngine(step), pointer(mid_tag(0, step), 0, step), {})
    ckpt.save(FakeEngine(7), pointer(end_tag(0), 0, 7, done=True), {})
    for step in (2, 4):
        ckpt.save(FakeEngine(step), pointer(mid_tag(1, step), 1, step), {})
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["s01-end", "s02-step000002", "s02-step000004"]


def test_pointer_to_a_missing_tag_is_a_clear_error(tmp_path):
    ckpt = StageCheckpoint(tmp_path, keep=1)
    ckpt.save(FakeEngine(1.0), pointer(mid_tag(0, 2), 0, 2), {})
    (tmp_path / "s01-step000002" / "strata.json").unlink()
    (tmp_path / "s01-step000002").rename(tmp_path / "gone")
    with pytest.raises(ResumeError, match="s01-step000002"):
        ckpt.latest()


def test_universal_conversion_needed_only_for_partitioned_optimizer_on_another_world_size(tmp_path):
    two = StageCheckpoint(tmp_path, keep=2, rank=0, world_size=2)
    two.save(FakeEngine(1.0), pointer("s01-step000002", 0, 2, world=2, zero=1), {})
    two.save(FakeEngine(1.0), pointer("s01-step000004", 0, 4, world=2, zero=0), {})
    one = StageCheckpoint(tmp_path, keep=2, rank=0, world_size=1)
    assert one.needs_universal("s01-step000002", loads_optimizer=True)
    assert not one.needs_universal("s01-step000002", loads_optimizer=False)  # weights only: no partitions
    assert not one.needs_universal("s01-step000004", loads_optimizer=True)  # ZeRO 0: one optimizer file
    assert not two.needs_universal("s01-step000002", loads_optimizer=True)


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_stage_starts_from_rng_states_of_seed_stage_and_rank_alone_or_the_saved_ones():
    def draws() -> tuple:
        return random.random(), np.random.rand(), torch.rand(1).item()

    torch.manual_seed(123), torch.rand(5)  # whatever ran before in this process
    start_stage_rng(7, 1, 0, None)
    first = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    start_stage_rng(7, 1, 0, None)
    assert draws() == first  # the same states, whatever came before
    start_stage_rng(7, 2, 0, None)
    other_stage = draws()
    start_stage_rng(7, 1, 1, None)
    assert len({first, other_stage, draws()}) == 3  # another stage, another rank: other masks
    saved = rng_state()
    expected = draws()
    start_stage_rng(7, 1, 0, saved)  # a resumed stage: the states its checkpoint held
    assert draws() == expected
