"""Per-stage LR schedules: warmup from min to max, then each decay shape's end values."""

from __future__ import annotations

import math

import pytest

from pipeline.recipe.schedule import StageSchedule, warmup_steps
from pipeline.recipe.spec import Schedule


def lrs(decay: str, steps: int = 100, warmup: float = 10, **kw) -> list[float]:
    sched = StageSchedule.from_recipe(Schedule(max_lr=1e-3, min_lr=1e-4, warmup=warmup, decay=decay, **kw), steps)
    return [sched.lr(s) for s in range(steps)]


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant", "wsd"])
def test_warmup_rises_from_min_to_max(decay):
    values = lrs(decay)
    warm = values[:10]
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert 1e-4 < warm[0] < 2e-4  # first step just above min_lr, not at max
    assert warm[-1] == pytest.approx(1e-3)


@pytest.mark.parametrize("decay,end", [("cosine", 1e-4), ("linear", 1e-4), ("constant", 1e-3), ("wsd", 1e-4)])
def test_decay_end_values(decay, end):
    values = lrs(decay)
    assert values[-1] == pytest.approx(end)
    assert all(1e-4 - 1e-12 <= v <= 1e-3 + 1e-12 for v in values)
    if decay != "constant":
        after = values[10:]
        assert all(b <= a for a, b in zip(after, after[1:]))  # monotone after warmup


def test_cosine_midpoint_and_linear_midpoint():
    cos, lin = lrs("cosine", steps=110), lrs("linear", steps=110)
    # 100 decay steps after 10 warmup: step 59 is progress 0.5.
    assert cos[59] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lin[59] == pytest.approx(1e-3 - 0.9e-3 * 0.5)


def test_wsd_holds_max_then_decays_over_the_final_fraction():
    values = lrs("wsd", steps=100, decay_fraction=0.2)
    assert all(v == 1e-3 for v in values[10:80])
    assert values[80] < 1e-3
    assert values[-1] == pytest.approx(1e-4)


def test_warmup_fraction_and_steps_match_the_plan_rule():
    assert warmup_steps(Schedule(max_lr=1.0, warmup=0.05), 200) == 10
    assert warmup_steps(Schedule(max_lr=1.0, warmup=7), 200) == 7
    assert warmup_steps(Schedule(max_lr=1.0, warmup=500), 200) == 200  # capped at the stage length
    assert warmup_steps(Schedule(max_lr=1.0, warmup=0.0), 50) == 0
    assert lrs("cosine", warmup=0)[0] < 1e-3  # no warmup: the decay starts at once


def test_each_stage_rewarms_from_its_own_min():
    first = StageSchedule.from_recipe(Schedule(max_lr=1e-3, min_lr=1e-4, warmup=5, decay="cosine"), 20)
    second = StageSchedule.from_recipe(Schedule(max_lr=5e-4, min_lr=5e-5, warmup=5, decay="cosine"), 20)
    assert first.lr(19) == pytest.approx(1e-4)
    assert second.lr(0) == pytest.approx(5e-5 + 4.5e-4 / 5)
    assert second.lr(4) == pytest.approx(5e-4)


def test_step_outside_the_stage_is_an_error():
    sched = StageSchedule.from_recipe(Schedule(max_lr=1e-3), 10)
    with pytest.raises(ValueError):
        sched.lr(10)
