"""The stream: exact mixing, packing with document boundaries, rank slices, and exact resume."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import recipe_dict, write_recipe

from pipeline.cli import main
from pipeline.data import mixer as mixer_module
from pipeline.data import shards as shards_module
from pipeline.data.mixer import Mixer
from pipeline.data.packer import cu_seqlens, pack, position_ids
from pipeline.data.shards import load_shard, shard_paths
from pipeline.data.stream import SourceWindows, StageStream, rank_slice
from pipeline.errors import ResumeError
from pipeline.recipe.load import load_recipe

EOS = 2


# ---------------------------------------------------------------------------------------------
# Mixer


@pytest.mark.parametrize("seed", range(20))
def test_mixer_matches_weights_within_one_sample_at_every_prefix(seed):
    rng = random.Random(seed)
    shares = [rng.uniform(0.01, 5) for _ in range(rng.randint(2, 6))]
    mixer = Mixer(shares)
    counts = [0] * len(shares)
    for n, (source, before) in enumerate(mixer.assign(counts[:], 0, 3000), start=1):
        assert before == counts[source]
        counts[source] += 1
        for share, count in zip(mixer.shares, counts):
            assert abs(count - share * n) < 1.0, (n, counts, mixer.shares)


def test_mixer_assign_continues_from_counts_like_one_long_run():
    mixer = Mixer([0.5, 0.3, 0.2])
    whole = mixer.assign([0, 0, 0], 0, 100)
    counts = [0, 0, 0]
    first = mixer.assign(counts, 0, 37)
    assert first + mixer.assign(counts, 37, 63) == whole


def test_mixer_rejects_bad_shares():
    with pytest.raises(ValueError):
        Mixer([])
    with pytest.raises(ValueError):
        Mixer([1.0, -0.5])


# ---------------------------------------------------------------------------------------------
# Packer


def test_pack_restarts_positions_after_every_eos_and_shifts_labels():
    window = np.array([5, 6, 7, EOS, 8, 9, EOS, EOS, 10, 11, 12])
    inputs, labels, positions = pack(window, EOS)
    assert inputs.tolist() == [5, 6, 7, EOS, 8, 9, EOS, EOS, 10, 11]
    assert labels.tolist() == [6, 7, EOS, 8, 9, EOS, EOS, 10, 11, 12]
    assert positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 0, 1]
    assert cu_seqlens(positions).tolist() == [0, 4, 7, 8, 10]


def test_position_ids_of_a_window_without_eos_count_from_zero():
    assert position_ids(np.array([4, 4, 4, 4]), EOS).tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Shared prepared data: three real sources, small shards so that windows cross shard boundaries.


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import small_corpus

    tmp = tmp_path_factory.mktemp("stream")
    paths = {"en": small_corpus(tmp, "en", 40), "py": small_corpus(tmp, "code", 40), "de": small_corpus(tmp, "de", 40)}
    stages = [
        {"name": "one", "tokens": 30 * 8 * 64, "schedule": {"max_lr": 1e-3},
         "sources": [{"name": "en", "path": str(paths["en"]), "weight": 3},
                     {"name": "py", "path": str(paths["py"]), "weight": 1}]},
        {"name": "two", "tokens": 20 * 8 * 64, "schedule": {"max_lr": 1e-3},
         "sources": [{"name": "de", "path": str(paths["de"])}], "replay": {"ratio": 0.25}},
    ]
    recipe_path = write_recipe(tmp, recipe_dict(tmp, stages, data={"dir": str(tmp / "data"), "heldout": 0.0,
                                                                    "shard_tokens": 3000}))
    assert main(["prepare", str(recipe_path), "--quiet"]) == 0
    return load_recipe(recipe_path)


def drain(stream: StageStream, steps: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, batch in enumerate(stream):
        out.append(batch)
        if steps is not None and i + 1 == steps * stream.grad_accum:
            break
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_sources_have_several_shards(prepared):
    for name in ("en", "py", "de"):
        assert len(shard_paths(prepared, name)) >= 3


def test_stream_is_a_pure_function_of_the_recipe_and_seed(prepared):
    a = drain(StageStream(prepared, 0))
    b = drain(StageStream(prepared, 0))
    assert same(a, b)
    assert len(a) == 30 * StageStream(prepared, 0).grad_accum
    prepared.seed += 1
    try:
        c = drain(StageStream(prepared, 0), steps=3)
    finally:
        prepared.seed -= 1
    assert not same(a[: len(c)], c)


def test_batches_have_the_packed_shapes_and_document_positions(prepared):
    batch = next(StageStream(prepared, 0))
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].shape == (prepared.batch.micro, prepared.seq_len)
        assert batch[key].dtype == torch.int64
    for row in range(prepared.batch.micro):
        inputs = batch["input_ids"][row].numpy()
        expected = position_ids(inputs, EOS)
        assert batch["position_ids"][row].tolist() == expected.tolist()
        assert torch.equal(batch["input_ids"][row, 1:], batch["labels"][row, :-1])


def test_stage_mixture_is_exact_in_sample_counts(prepared):
    stream = StageStream(prepared, 0)
    names = stream.global_sources(0, 30 * 8)
    counts = Counter(names)
    assert counts == {"en": 180, "py": 60}
    for n in range(1, len(names) + 1):
        assert abs(names[:n].count("en") - 0.75 * n) < 1


def test_one_epoch_of_a_source_holds_every_document_once(prepared):
    windows = SourceWindows(prepared, "en", prepared.seq_len)
    epoch = windows.read(0, windows.epoch_tokens)
    stored = [load_shard(p, meta["sha256"]) for p, meta in shard_paths(prepared, "en")]
    docs = sum(len(offsets) - 1 for _, offsets in stored)
    expected = Counter(np.concatenate([values for values, _ in stored]).tolist())
    expected[EOS] += docs
    assert Counter(epoch.tolist()) == expected
    second = windows.read(windows.epoch_tokens, windows.epoch_tokens)
    assert Counter(second.tolist()) == expected
    assert not np.array_equal(epoch, second), "each epoch has its own document order"


def test_windows_overlap_by_one_token_across_shard_boundaries(prepared):
    windows = SourceWindows(prepared, "py", prepared.seq_len)
    stream = windows.read(0, 80 * prepared.seq_len + 1)
    for k in range(80):
        w = windows.window(k)
        assert np.array_equal(w, stream[k * prepared.seq_len:(k + 1) * prepared.seq_len + 1])
    # 80 windows of 64 tokens span more than one ~3000-token shard
    assert 80 * prepared.seq_len > windows.shard_lengths.max()


# ---------------------------------------------------------------------------------------------
# Ranks


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_rank_slices_are_disjoint_and_cover_the_global_batch(world):
    slices = [set(rank_slice(r, world, 8)) for r in range(world)]
    assert set().union(*slices) == set(range(8))
    assert sum(len(s) for s in slices) == 8


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_see_exactly_the_single_process_stream(prepared, world):
    single = drain(StageStream(prepared, 0), steps=6)
    ranks = [drain(StageStream(prepared, 0, rank=r, world_size=world), steps=6) for r in range(world)]
    accum1, accum_w = len(single) // 6, len(ranks[0]) // 6
    for step in range(6):
        ref = torch.cat([b["input_ids"] for b in single[step * accum1:(step + 1) * accum1]])
        got = torch.cat([b["input_ids"] for r in ranks for b in r[step * accum_w:(step + 1) * accum_w]])
        assert torch.equal(ref, got)


# ---------------------------------------------------------------------------------------------
# State


@pytest.mark.parametrize("cut", [1, 4, 7, 13, 22, 29])
def test_state_round_trip_continues_exactly_like_an_uninterrupted_stream(prepared, cut):
    full = drain(StageStream(prepared, 0))
    first = StageStream(prepared, 0)
    head = drain(first, steps=cut)
    state = first.state_dict()
    assert state["steps_done"] == cut
    resumed = StageStream(prepared, 0)
    resumed.load_state_dict(state)
    assert same(head + drain(resumed), full)


def test_cut_points_cross_shard_boundaries(prepared):
    """The cut points above land in different shards of the sources, so resume crosses shard edges."""
    stream = StageStream(prepared, 0)
    drain(stream, steps=29)
    cursors = stream.state_dict()["cursors"]
    windows = SourceWindows(prepared, "en", prepared.seq_len)
    assert cursors["en"] * prepared.seq_len > 2 * windows.shard_lengths.max()


def test_state_is_json_serialisable_and_small(prepared):
    import json

    stream = StageStream(prepared, 1, carried=None)
    drain(stream, steps=3)
    text = json.dumps(stream.state_dict())
    assert len(text) < 2000
    assert json.loads(text) == stream.state_dict()


def test_resume_with_another_world_size_keeps_the_global_order(prepared):
    full = drain(StageStream(prepared, 0))  # one process
    accum = len(full) // 30
    two = [StageStream(prepared, 0, rank=r, world_size=2) for r in range(2)]
    for s in two:
        drain(s, steps=11)
    states = [s.state_dict() for s in two]
    assert states[0] == states[1], "every rank holds the same state"
    one = StageStream(prepared, 0)
    one.load_state_dict(states[0])
    assert same(drain(one), full[11 * accum:])


def test_loading_a_state_does_not_replay_the_stream(prepared, monkeypatch):
    """Skipping far ahead costs O(shards): no mixer decisions for skipped samples, few shard loads."""
    first = StageStream(prepared, 0)
    drain(first, steps=1)
    state = first.state_dict()
    far = 10**7 * prepared.batch.global_
    state["samples"] = far
    state["cursors"] = {"en": far * 3 // 4, "py": far // 4}
    stream = StageStream(prepared, 0)
    stream.steps = None  # endless, so that the far position is still inside the stage
    stream.load_state_dict(state)
    choices, loads = [], []
    original_choose = mixer_module.Mixer.choose
    monkeypatch.setattr(mixer_module.Mixer, "choose", lambda self, c, n: choices.append(n) or original_choose(self, c, n))
    load_shard.cache_clear()
    original_load = shards_module.load_shard.__wrapped__
    monkeypatch.setattr("pipeline.data.stream.load_shard", lambda p, h: loads.append(p) or original_load(p, h))
    next(stream)
    assert len(choices) == prepared.batch.global_
    assert min(choices) == far
    assert len(loads) <= 4


def test_next_stage_continues_replayed_sources_from_their_cursors(prepared):
    one = StageStream(prepared, 0)
    drain(one)
    end = one.state_dict()
    two = StageStream(prepared, 1, carried=end)
    assert two.stage_start["en"] == end["cursors"]["en"] > 0
    assert two.stage_start["de"] == 0
    drain(two)
    state = two.state_dict()
    assert state["cursors"]["en"] > end["cursors"]["en"]
    # the replayed windows are the ones right after those read in stage one
    en = SourceWindows(prepared, "en", prepared.seq_len)
    k = two.names.index("en")
    assert np.array_equal(two.window(k, 0), en.window(end["cursors"]["en"]))


def test_changed_shards_are_refused_on_resume(prepared):
    stream = StageStream(prepared, 0)
    drain(stream, steps=2)
    state = stream.state_dict()
    state["fingerprints"]["en"] = "0" * 16
    with pytest.raises(ResumeError, match="shards of source 'en' changed"):
        StageStream(prepared, 0).load_state_dict(state)


def test_changed_global_batch_is_refused_on_resume(prepared):
    stream = StageStream(prepared, 0)
    drain(stream, steps=2)
    state = stream.state_dict()
    state["global_batch"] = 16
    with pytest.raises(ResumeError, match="global_batch"):
        StageStream(prepared, 0).load_state_dict(state)


def test_a_small_buffer_budget_gives_the_same_windows_with_bounded_memory(tmp_path, three_sources):
    """data.buffer_mb bounds the decompressed shards kept over all sources; windows do not change."""
    from conftest import prepared_recipe

    from pipeline.data.buffers import BUFFERS
    from pipeline.data.stream import SourceWindows
    from pipeline.recipe.load import load_recipe

    stage = {"name": "s", "sources": [{"name": n, "path": str(p)} for n, p in three_sources.items()],
             "schedule": {"max_lr": 1e-3}}
    recipe = load_recipe(prepared_recipe(tmp_path, recipe_dict(tmp_path, [stage], data={
        "dir": str(tmp_path / "data"), "heldout": 0.0, "shard_tokens": 800, "buffer_mb": 1})))
    reads = [(n, k) for k in range(0, 120, 7) for n in range(3)]
    wide = [SourceWindows(recipe, name, 64) for name in three_sources]
    expected = [wide[n].window(k) for n, k in reads]
    BUFFERS.items.clear()
    BUFFERS.bytes = 0
    narrow = [SourceWindows(recipe, name, 64) for name in three_sources]
    assert narrow[0]._budget == 1 << 20
    for source in narrow:
        source._budget = 4000  # bytes: about two shards of 800 tokens (uint16)
    for (n, k), want in zip(reads, expected):
        assert np.array_equal(narrow[n].window(k), want)
        assert BUFFERS.bytes <= 4000 + max(b.nbytes for b in BUFFERS.items.values())
    assert len(BUFFERS.items) < sum(len(s.shards) for s in narrow)  # shards were evicted and read again
