"""The sweep's law: its fit recovers known parameters, its predictions are monotone where they
must be, and the recommended value keeps the old domains within the tolerance on the fitted curves."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import StrataError
from pipeline.evaluate.sweep_law import fit_law, law
from pipeline.evaluate.sweep_plan import NEW, OLD, Measured, Sweep, make_plan, max_rise, value_grid
from pipeline.evaluate.sweep_report import table

FRACTIONS = (0.05, 0.1, 0.2, 0.4)
SHARES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
LEARNED = np.array([2.0, 0.8, 0.5, -0.4, 0.3, 0.6])  # E, B, b, h, C, g: a domain the stage teaches
FORGOTTEN = np.array([3.0, -0.3, 0.4, 0.5, 0.2, 0.8])  # B < 0: the stage makes the model forget it


def _points(params: np.ndarray, noise: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.array([f for _ in SHARES for f in FRACTIONS])
    u = np.array([s for s in SHARES for _ in FRACTIONS])
    y = law(params, x, u) * (1 + np.random.default_rng(seed).normal(0, noise, len(x)))
    return x, u, y


@pytest.mark.parametrize("true", [LEARNED, FORGOTTEN], ids=["learned", "forgotten"])
def test_fit_recovers_the_parameters_of_points_drawn_from_the_law(true):
    fit = fit_law(*_points(true, noise=0.001), bootstrap=20)
    np.testing.assert_allclose(fit.params, true, rtol=0.05, atol=0.02)
    assert fit.rmse < 0.002
    std = fit.as_dict()["std"]
    assert 0 < std["b"] < 0.05  # the bootstrap spread is small but not zero with noisy points


def test_prediction_at_the_full_budget_from_small_proxies_and_its_interval():
    x, u, y = _points(LEARNED, noise=0.002)
    fit = fit_law(x, u, y, bootstrap=40)
    for share in (0.0, 0.5, 1.0):
        truth = float(law(LEARNED, 1.0, share))
        assert abs(float(fit.predict(1.0, share)) / truth - 1) < 0.01
        lo, hi = fit.interval(1.0, share)
        assert lo < hi and lo - 0.02 < truth < hi + 0.02


@pytest.mark.parametrize("true", [LEARNED, FORGOTTEN], ids=["learned", "forgotten"])
def test_more_of_a_domains_own_data_never_raises_its_predicted_loss(true):
    fit = fit_law(*_points(true, noise=0.01, seed=3), bootstrap=0)
    shares = np.linspace(0, 1, 41)
    for x in (0.05, 0.3, 1.0):
        assert np.all(np.diff(fit.predict(x, shares)) <= 1e-12)
    tokens = fit.predict(np.linspace(0.05, 1, 20), 0.5)  # one direction in tokens
    assert np.all(np.diff(tokens) <= 1e-12) if true[1] > 0 else np.all(np.diff(tokens) >= -1e-12)


def test_two_token_counts_cannot_identify_the_law():
    x, u, y = _points(LEARNED, noise=0.0)
    keep = x <= 0.1
    with pytest.raises(StrataError, match="3 or more token counts"):
        fit_law(x[keep], u[keep], y[keep])


def _replay_sweep(tolerance: float) -> tuple[Sweep, list[Measured]]:
    """A synthetic replay sweep: German (new, share 1 - r) and English (old, share r)."""
    full = 1_000_000
    sweep = Sweep("stages[1].replay.ratio", full, {"de": NEW, "en": OLD}, {"en": 3.3, "de": 5.0},
                  lambda r: {"de": 1 - r, "en": r}, tolerance)
    measured = [Measured(r, int(f * full), {"de": float(law(LEARNED, f, 1 - r)), "en": float(law(FORGOTTEN, f, r))})
                for r in (0.0, 0.1, 0.25, 0.5) for f in (0.025, 0.05, 0.1)]
    return sweep, measured


def test_the_recommended_ratio_respects_the_tolerance_on_the_fitted_curve():
    sweep, measured = _replay_sweep(tolerance=0.05)
    plan = make_plan(sweep, measured, bootstrap=10)
    assert plan.feasible
    r = plan.recommended
    assert 0 < r < 0.5 and plan.rise(r) <= 0.05
    lower = plan.grid[plan.grid.index(r) - 1]  # one step less replay breaks the tolerance ...
    assert plan.rise(lower) > 0.05
    assert plan.objective(lower) < plan.objective(r)  # ... and would have been better for German
    doc = plan.as_dict()
    assert doc["recommended"] == r and set(doc["predicted"][f"{r:g}"]) == {"de", "en"}


def test_no_value_within_the_tolerance_recommends_the_one_that_forgets_least():
    sweep, measured = _replay_sweep(tolerance=-0.5)
    plan = make_plan(sweep, measured, bootstrap=0)
    assert not plan.feasible
    assert plan.rise(plan.recommended) == min(max_rise(sweep, plan.predicted[v]) for v in plan.grid)


def test_value_grid_spans_the_swept_range():
    assert value_grid([0.0, 0.05, 0.5])[:3] == [0.0, 0.01, 0.02] and value_grid([0.0, 0.5])[-1] == 0.5
    assert 0.333 in value_grid([0.333, 0.5])
    weights = value_grid([1.0, 3.0, 201.0])  # source weights: multiples of a hundredth of the range, and the values
    assert len(weights) == 103 and weights[:4] == [1.0, 2.0, 3.0, 4.0] and weights[-1] == 201.0


def test_a_law_that_misses_its_proxies_is_flagged():
    sweep, measured = _replay_sweep(tolerance=0.05)
    assert make_plan(sweep, measured, bootstrap=0).warnings() == []
    bumpy = [Measured(m.value, m.tokens, {d: v * (1.04 if m.tokens == 50_000 else 1.0) for d, v in m.loss.items()})
             for m in measured]  # a warm-up bump at the middle budget: no power law in tokens fits it
    plan = make_plan(sweep, bumpy, bootstrap=0)
    assert any("misses the proxies of de" in w for w in plan.warnings())
    assert "warning: the law misses" in table(plan) and plan.as_dict()["warnings"] == plan.warnings()
