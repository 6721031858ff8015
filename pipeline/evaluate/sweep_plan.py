"""From proxy measurements to a plan: one law per domain, predictions at the full budget, the pick.

Inputs are plain numbers (what each proxy measured, each domain's share of the stage at every
swept value, each domain's loss before the stage), so this module knows nothing of runs or
recipes. The recommendation rule, in one place: among the values in the swept range, the one
that minimises the mean predicted loss of the stage's own ("new") domains at the full budget,
subject to every old domain rising by at most `tolerance` (relative to its loss before the stage)
on the fitted curves. When no value keeps every old domain within the tolerance, the value with
the smallest rise is recommended and `feasible` is false.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluate.sweep_law import LawFit, fit_law

NEW, OLD, OTHER = "new", "old", "other"  # the stage's own domains, earlier ones, eval sets
POOR_FIT = 0.01  # a law missing its own proxies by more than this (relative rmse) is flagged


@dataclass(frozen=True)
class Measured:
    """One finished proxy: the swept value it ran at, its tokens, and each domain's held-out loss."""

    value: float
    tokens: int
    loss: dict[str, float]


@dataclass
class Sweep:
    """What was swept and how the domains relate to it."""

    knob: str  # the recipe key the swept value patches, e.g. stages[2].replay.ratio
    full_tokens: int  # the stage's full budget
    roles: dict[str, str]  # domain -> NEW | OLD | OTHER
    before: dict[str, float]  # domain -> held-out loss before the stage
    share: Callable[[float], dict[str, float]]  # swept value -> each domain's share of the stage's tokens
    tolerance: float = 0.02


@dataclass
class Plan:
    sweep: Sweep
    fits: dict[str, LawFit]
    grid: list[float]
    predicted: dict[float, dict[str, float]]  # value -> domain -> loss at the full budget
    intervals: dict[float, dict[str, tuple[float, float]]]
    recommended: float
    feasible: bool
    measured: list[Measured] = field(default_factory=list)

    def rise(self, value: float) -> float:
        """The largest relative rise of an old domain at `value` (0 when there is none)."""
        return max_rise(self.sweep, self.predicted[value])

    def objective(self, value: float) -> float:
        return new_loss(self.sweep, self.predicted[value])

    def warnings(self) -> list[str]:
        """Fits too poor to extrapolate from: the proxies are likely too short (still in the LR
        warm-up's transient, where the loss is not yet a power law in tokens) or too noisy."""
        return [f"the law misses the proxies of {d} by {f.rmse:.1%} (rmse): they are likely too short or too noisy "
                "for a prediction at the full budget; raise --budget or give fewer values"
                for d, f in self.fits.items() if f.rmse > POOR_FIT]

    def as_dict(self) -> dict:
        key = _key
        return {
            "knob": self.sweep.knob, "full_tokens": self.sweep.full_tokens, "tolerance": self.sweep.tolerance,
            "rule": "minimise the mean new-domain loss with every old domain's relative rise <= tolerance",
            "domains": self.sweep.roles, "before": self.sweep.before,
            "fits": {d: f.as_dict() for d, f in self.fits.items()},
            "measured": [{"value": m.value, "tokens": m.tokens, "fraction": m.tokens / self.sweep.full_tokens,
                          "loss": m.loss} for m in self.measured],
            "predicted": {key(v): self.predicted[v] for v in self.grid},
            "interval_90": {key(v): {d: list(i) for d, i in self.intervals[v].items()} for v in self.grid},
            "rise": {key(v): self.rise(v) for v in self.grid},
            "recommended": self.recommended, "feasible": self.feasible, "warnings": self.warnings(),
        }


def _key(value: float) -> str:
    return f"{value:g}"


def max_rise(sweep: Sweep, losses: dict[str, float]) -> float:
    rises = [losses[d] / sweep.before[d] - 1 for d, r in sweep.roles.items() if r == OLD and d in losses]
    return max(rises, default=0.0)


def new_loss(sweep: Sweep, losses: dict[str, float]) -> float:
    return float(np.mean([losses[d] for d, r in sweep.roles.items() if r == NEW and d in losses]))


def value_grid(values: list[float]) -> list[float]:
    """The swept values and every multiple of a step between the smallest and the largest: 0.01
    for ratios (a range within 1), a hundredth of the range for weights."""
    lo, hi = min(values), max(values)
    step = 0.01 if hi - lo <= 1 else (hi - lo) / 100
    grid = {round(v, 6) for v in values}
    grid |= {round(float(v), 6) for v in np.arange(np.ceil(lo / step) * step, hi + step / 2, step) if lo <= v <= hi}
    return sorted(grid)


def make_plan(sweep: Sweep, measured: list[Measured], bootstrap: int = 100, seed: int = 0) -> Plan:
    """Fit every domain, predict it over the swept range at the full budget, and recommend."""
    fits = {}
    for domain in sweep.roles:
        points = [m for m in measured if domain in m.loss]
        fits[domain] = fit_law([m.tokens / sweep.full_tokens for m in points],
                               [sweep.share(m.value)[domain] for m in points],
                               [m.loss[domain] for m in points], bootstrap, seed)
    grid = value_grid([m.value for m in measured])
    predicted, intervals = {}, {}
    for v in grid:
        share = sweep.share(v)
        predicted[v] = {d: float(f.predict(1.0, share[d])) for d, f in fits.items()}
        intervals[v] = {d: f.interval(1.0, share[d]) for d, f in fits.items()}
    recommended, feasible = recommend(sweep, predicted)
    return Plan(sweep, fits, grid, predicted, intervals, recommended, feasible, list(measured))


def recommend(sweep: Sweep, predicted: dict[float, dict[str, float]]) -> tuple[float, bool]:
    """(value, feasible): the best value within the tolerance, else the one that forgets least."""
    within = [v for v in predicted if max_rise(sweep, predicted[v]) <= sweep.tolerance]
    if within:
        return min(within, key=lambda v: (new_loss(sweep, predicted[v]), v)), True
    return min(predicted, key=lambda v: (max_rise(sweep, predicted[v]), v)), False
