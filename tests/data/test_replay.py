"""Replay of earlier stages, and the stream in DataLoader workers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import recipe_dict, small_corpus, write_recipe

from pipeline.cli import main
from pipeline.data.context import StageContext
from pipeline.data.loader import BatchStream, StreamLoader, make_loader
from pipeline.data.stream import SourceWindows, StageStream, _affine_permutation
from pipeline.errors import RecipeError
from pipeline.recipe.load import load_recipe
from pipeline.recipe.plan import stage_mixture

STEPS = (12, 10, 10)


def stages(paths: dict, third_replay: dict) -> list[dict]:
    return [
        {"name": "one", "tokens": STEPS[0] * 8 * 64, "schedule": {"max_lr": 1e-3},
         "sources": [{"name": "en", "path": str(paths["en"])}]},
        {"name": "two", "tokens": STEPS[1] * 8 * 64, "schedule": {"max_lr": 1e-3},
         "sources": [{"name": "py", "path": str(paths["py"])}], "replay": {"ratio": 0.25, "from": ["one"]}},
        {"name": "three", "tokens": STEPS[2] * 8 * 64, "schedule": {"max_lr": 1e-3},
         "sources": [{"name": "de", "path": str(paths["de"])}], "replay": third_replay},
    ]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    return tmp, {"en": small_corpus(tmp, "en", 30), "py": small_corpus(tmp, "code", 30),
                 "de": small_corpus(tmp, "de", 30)}


def make(corpora, third_replay: dict, name: str, **overrides):
    tmp, paths = corpora
    raw = recipe_dict(tmp, stages(paths, third_replay), data={"dir": str(tmp / "data"), "heldout": 0.0,
                                                               "shard_tokens": 4000}, **overrides)
    path = write_recipe(tmp, raw, name)
    assert main(["prepare", str(path), "--quiet"]) == 0
    return load_recipe(path)


@pytest.fixture(scope="module")
def continued(corpora):
    return make(corpora, {"ratio": 0.3, "weights": {"en": 1, "py": 3}}, "continue.yaml")


@pytest.fixture(scope="module")
def resampled(corpora):
    return make(corpora, {"ratio": 0.3, "mode": "resample"}, "resample.yaml")


def run_stages(recipe, upto: int) -> list[dict]:
    """Final stream states of stages 0..upto, each stage started from the previous one's."""
    states, carried = [], None
    for i in range(upto + 1):
        stream = StageStream(recipe, i, carried=carried)
        for _ in stream:
            pass
        carried = stream.state_dict()
        states.append(carried)
    return states


def test_replay_is_a_share_of_the_stage_split_by_explicit_weights(continued):
    mixture = {c.source: c for c in stage_mixture(continued, 2)}
    assert mixture["de"].share == pytest.approx(0.7)
    assert mixture["en"].share == pytest.approx(0.3 * 1 / 4)
    assert mixture["py"].share == pytest.approx(0.3 * 3 / 4)
    assert mixture["en"].replay_of == "one" and mixture["py"].replay_of == "two"


def test_replay_shares_are_exact_at_every_prefix(continued):
    stream = StageStream(continued, 2, carried=run_stages(continued, 1)[-1])
    names = stream.global_sources(0, STEPS[2] * 8)
    shares = {c.source: c.share for c in stage_mixture(continued, 2)}
    seen: Counter = Counter()
    for n, name in enumerate(names, start=1):
        seen[name] += 1
        for source, share in shares.items():
            assert abs(seen[source] - share * n) < 1, (n, seen)


def test_replay_continues_each_source_from_its_cursor(continued):
    end_one, end_two = run_stages(continued, 1)
    assert end_two["cursors"]["en"] > end_one["cursors"]["en"] > 0  # stage two replayed en onwards
    three = StageStream(continued, 2, carried=end_two)
    en = SourceWindows(continued, "en", continued.seq_len)
    k = three.names.index("en")
    for count in range(3):
        assert np.array_equal(three.window(k, count), en.window(end_two["cursors"]["en"] + count))
    for _ in three:
        pass
    state = three.state_dict()
    assert state["cursors"]["en"] == end_two["cursors"]["en"] + state["counts"]["en"]
    assert state["cursors"]["de"] == state["counts"]["de"]


def test_resample_draws_only_windows_seen_before_and_leaves_cursors(resampled):
    end_two = run_stages(resampled, 1)[-1]
    three = StageStream(resampled, 2, carried=end_two)
    for source in ("en", "py"):
        k, seen = three.names.index(source), end_two["cursors"][source]
        windows = SourceWindows(resampled, source, resampled.seq_len)
        old = {windows.window(i).tobytes() for i in range(seen)}
        drawn = [three.window(k, c).tobytes() for c in range(seen)]
        assert set(drawn) == old, "one cycle visits every window seen before, each once"
        assert drawn != [windows.window(i).tobytes() for i in range(seen)], "in a shuffled order"
    for _ in three:
        pass
    state = three.state_dict()
    assert state["counts"]["en"] > 0
    assert state["cursors"]["en"] == end_two["cursors"]["en"]  # nothing new was read
    assert state["cursors"]["py"] == end_two["cursors"]["py"]


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
def test_affine_permutation_is_a_permutation(n):
    for cycle in range(3):
        assert sorted(_affine_permutation(k, n, 5, cycle) for k in range(n)) == list(range(n))


@pytest.mark.parametrize("cut", [1, 4, 9])
def test_resume_in_the_middle_of_a_replaying_stage_equals_uninterrupted(continued, resampled, cut):
    for recipe in (continued, resampled):
        carried = run_stages(recipe, 1)[-1]
        full = [b["input_ids"] for b in StageStream(recipe, 2, carried=carried)]
        first = StageStream(recipe, 2, carried=carried)
        head = [next(first)["input_ids"] for _ in range(cut * first.grad_accum)]
        resumed = StageStream(recipe, 2, carried=carried)
        resumed.load_state_dict(first.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(head + [b["input_ids"] for b in resumed], full, strict=True))


def test_replay_weights_must_name_replayed_sources(corpora):
    tmp, paths = corpora
    raw = recipe_dict(tmp, stages(paths, {"ratio": 0.3, "from": ["two"], "weights": {"en": 1, "pyy": 1}}))
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp, raw, "bad.yaml"))
    problems = "\n".join(e.value.problems)
    assert "stages[2].replay.weights.en: is not a source of the replayed stages" in problems
    assert "stages[2].replay.weights.pyy: is not a source of the replayed stages (did you mean 'py'?)" in problems


def test_check_and_train_refuse_replaying_a_source_more_than_max_passes(corpora, capsys):
    tmp, _ = corpora
    recipe = make(corpora, {"ratio": 0.9}, "passes.yaml")
    raw = dict(recipe.raw)
    raw["stages"] = [dict(s) for s in raw["stages"]]
    raw["stages"][2]["tokens"] = 400_000  # 0.9 of it from two small old sources: many passes
    path = write_recipe(tmp, raw, "passes2.yaml")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages[2]: replay of source 'en' would be read" in err and "max_passes" in err
    refused = next(line for line in err.splitlines() if "would be read" in line)
    # strata train refuses it too, with the same line, before any work (no run folder is made)
    assert main(["train", str(path), "--run-dir", str(tmp / "run")]) == 2
    assert refused in capsys.readouterr().err.splitlines()
    assert not (tmp / "run").exists()


# ---------------------------------------------------------------------------------------------
# DataLoader workers


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_same_batches_as_the_main_process(continued, workers):
    carried = run_stages(continued, 1)[-1]
    plain = list(StageStream(continued, 2, rank=1, world_size=2, carried=carried))
    loader = StreamLoader(StageStream(continued, 2, rank=1, world_size=2, carried=carried), num_workers=workers)
    got = [next(loader) for _ in range(len(plain))]
    for a, b in zip(plain, got, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(StopIteration):
        next(loader)


def test_loader_state_counts_trained_steps_not_prefetched_ones(continued):
    loader = StreamLoader(StageStream(continued, 0), num_workers=2)
    reference = StageStream(continued, 0)
    for step in range(1, 5):
        for _ in range(loader.grad_accum):
            next(loader)
            next(reference)
        assert loader.state_dict() == reference.state_dict()
        assert loader.state_dict()["steps_done"] == step
    next(loader)  # inside a step: no state to save
    with pytest.raises(RuntimeError):
        loader.state_dict()


def test_loader_resumes_from_a_state(continued):
    full = [b["input_ids"] for b in StageStream(continued, 0)]
    first = StageStream(continued, 0)
    for _ in range(3 * first.grad_accum):
        next(first)
    loader = StreamLoader(StageStream(continued, 0), num_workers=2)
    loader.load_state_dict(first.state_dict())
    rest = [next(loader)["input_ids"] for _ in range(len(full) - 3 * first.grad_accum)]
    assert all(torch.equal(a, b) for a, b in zip(rest, full[3 * first.grad_accum:], strict=True))


def test_make_loader_uses_workers_only_when_asked(continued):
    assert isinstance(make_loader(StageContext.single_process(continued, 0)), StageStream)
    continued.train.num_workers = 2
    try:
        assert isinstance(make_loader(StageContext.single_process(continued, 0)), StreamLoader)
    finally:
        continued.train.num_workers = 0


def test_both_stream_classes_are_the_batch_stream_the_trainer_reads(continued):
    """The trainer reads `retokenized`, `close()` and the rest through the declared Protocol, not by
    reaching into a loader's inner stream."""
    plain = make_loader(StageContext.single_process(continued, 1))
    loader = StreamLoader(StageStream(continued, 1), num_workers=2)
    for stream in (plain, loader):
        assert isinstance(stream, BatchStream)
        assert (stream.steps, stream.grad_accum) == (plain.steps, plain.grad_accum)
    loader.load_state_dict({**plain.state_dict(), "retokenized": {"en": {"cursor": [1, 2]}}})
    assert loader.retokenized == {"en": {"cursor": [1, 2]}}  # follows the state it loaded
    loader.close()
    plain.close()


def test_the_stage_plan_is_handed_down_to_the_stream_and_its_workers_not_rebuilt(continued):
    import dataclasses

    from pipeline.data.shards import prepared_tokens
    from pipeline.recipe.plan import build_plan

    built = build_plan(continued, prepared_tokens(continued))[1]
    own = dataclasses.replace(built.mixture[0], share=1.0)  # no replay: not what a rebuilt plan would say
    plan = dataclasses.replace(built, steps=2, mixture=(own,))
    plain = make_loader(StageContext.single_process(continued, 1, plan))
    loader = StreamLoader(StageStream(continued, 1, plan=plan), num_workers=2)
    assert plain.steps == loader.steps == 2 and plain.plan is plan
    want = [next(plain)["input_ids"] for _ in range(4)]
    rebuilt = make_loader(StageContext.single_process(continued, 1))
    assert not all(torch.equal(next(rebuilt)["input_ids"], w) for w in want)
    assert all(torch.equal(next(loader)["input_ids"], w) for w in want)  # the workers' streams use it too
    loader.close()
