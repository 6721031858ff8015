"""The law `strata sweep` fits: a domain's held-out loss as a function of tokens and mixture share.

For one domain, with x = the stage's tokens as a fraction of its full budget (x = 1 is the full
stage) and u = the share of the stage's tokens that feeds this domain (1 - replay for the stage's
own domains, the replay ratio for the old ones):

    L(x, u) = E + B * (u + eps)^h * x^(-b) + C * (u + eps)^(-g)

the D-CPT law (Que et al. 2024) at a fixed model size, with its tokens scaled to the stage budget.
E + C (u + eps)^(-g) is where the loss goes with unlimited tokens at share u; the middle term is
how far from it the loss still is after x of the budget. B > 0 for a domain the stage teaches (the
loss falls towards its asymptote), B < 0 for a domain it makes the model forget (the loss rises
towards it). eps is fixed (EPS): a zero share is a valid point (no replay) and the proxies cannot
tell eps from g.

Invariant: every fitted law is monotone where it must be. More of a domain's own data never
raises its loss (dL/du <= 0: C, g >= 0 and sign(h) = -sign(B), enforced by bounds, both signs of B
fitted and the better kept), and the loss moves one way only in x (one power term).

Fit: scipy.optimize.least_squares on relative residuals (pred / measured - 1) with the soft-L1
(smooth Huber) loss, so one bad proxy cannot drag the curve, from a few starting points.
Uncertainty: a residual bootstrap (refit on fitted + resampled residuals), which keeps the design
(which ratios and token counts were run) intact, as is right for a dozen points. What the points
cannot identify is not fitted: with fewer than three distinct shares the share terms are dropped
(C = h = g = 0), and fewer than three distinct token counts is an error (B and b would trade).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from pipeline.errors import StrataError

EPS = 0.05  # shares within this of zero count as "almost none" (a proxy at 0% replay stays finite)
NAMES = ("E", "B", "b", "h", "C", "g")
F_SCALE = 0.01  # soft-L1 turns from squared to linear at a 1% relative residual
MAX_EVALS = 300  # per start; the law has six parameters and the fits converge well within it
TOL = 1e-6  # on the cost, the step and the gradient: losses are known to ~1e-3, so finer buys nothing
_UPPER = np.array([50.0, 50.0, 3.0, 3.0, 50.0, 3.0])  # E, |B|, b, |h|, C, g (B and h signed below)


def law(params: np.ndarray, x: np.ndarray, u: np.ndarray, eps: float = EPS) -> np.ndarray:
    """L(x, u) for params (E, B, b, h, C, g)."""
    e, b_coef, b, h, c, g = params
    share = np.asarray(u, dtype=float) + eps
    return e + b_coef * share ** h * np.asarray(x, dtype=float) ** (-b) + c * share ** (-g)


@dataclass
class LawFit:
    """A fitted law for one domain: parameters, their bootstrap spread, and how well it fits."""

    params: np.ndarray  # (E, B, b, h, C, g)
    samples: np.ndarray  # bootstrap refits, one row each
    rmse: float  # relative, on the fitted points
    points: int
    eps: float = EPS
    fitted: tuple[str, ...] = field(default=NAMES)  # the parameters the points identified

    def predict(self, x: float | np.ndarray, u: float | np.ndarray) -> np.ndarray:
        return law(self.params, x, u, self.eps)

    def interval(self, x: float, u: float, level: float = 0.9) -> tuple[float, float]:
        """The central `level` interval of the prediction over the bootstrap refits."""
        preds = law(self.samples.T, x, u, self.eps)  # every refit at once
        lo, hi = np.percentile(preds, [50 * (1 - level), 50 * (1 + level)])
        return float(lo), float(hi)

    def as_dict(self) -> dict:
        std = self.samples.std(axis=0) if len(self.samples) > 1 else np.zeros(len(NAMES))
        return {"law": "E + B*(u+eps)^h*x^-b + C*(u+eps)^-g", "eps": self.eps,
                "params": dict(zip(NAMES, map(float, self.params))),
                "std": dict(zip(NAMES, map(float, std))), "fitted": list(self.fitted),
                "rmse_relative": self.rmse, "points": self.points}


def _unpack(q: np.ndarray, sign: float, share_terms: bool) -> np.ndarray:
    """Fit vector (E, |B|, b, |h|, C, g) -> law params; sign(h) = -sign(B) keeps dL/du <= 0."""
    e, bmag, b, hmag, c, g = q
    if not share_terms:
        hmag, c, g = 0.0, 0.0, 0.0
    return np.array([e, sign * bmag, b, -sign * hmag, c, g])


def _solve(x: np.ndarray, u: np.ndarray, y: np.ndarray, starts: list[np.ndarray], sign: float,
           share_terms: bool) -> tuple[np.ndarray, float]:
    """The best of least-squares fits from `starts` at one sign of B: (law params, cost)."""
    best, best_cost = None, np.inf
    for q0 in starts:
        res = least_squares(lambda q: law(_unpack(q, sign, share_terms), x, u) / y - 1.0,
                            np.clip(q0, 0.0, _UPPER), bounds=(np.zeros(6), _UPPER),
                            loss="soft_l1", f_scale=F_SCALE, max_nfev=MAX_EVALS, ftol=TOL, xtol=TOL, gtol=TOL)
        if res.cost < best_cost:
            best, best_cost = _unpack(res.x, sign, share_terms), float(res.cost)
    return best, best_cost


def _starts(y: np.ndarray) -> list[np.ndarray]:
    m = float(np.mean(y))
    return [np.array([0.8 * float(np.min(y)), 0.1 * m, b, 0.5, 0.05 * m, g])
            for b in (0.3, 1.0) for g in (0.3, 1.0)]


def _refit_start(params: np.ndarray) -> np.ndarray:
    e, b_coef, b, h, c, g = params
    return np.array([e, abs(b_coef), b, abs(h), c, g])


def fit_law(x: list[float], u: list[float], loss: list[float], bootstrap: int = 100, seed: int = 0) -> LawFit:
    """Fit the law to measured points (x, u, loss) of one domain; `bootstrap` refits for the spread."""
    x, u, y = (np.asarray(v, dtype=float) for v in (x, u, loss))
    if len(np.unique(np.round(x, 9))) < 3:
        raise StrataError("the sweep needs proxies at 3 or more token counts to fit the token exponent "
                          f"(it has {len(np.unique(x))}); give --fractions three values or more")
    if np.any(y <= 0) or np.any(x <= 0):
        raise StrataError("the law needs positive losses and token counts")
    share_terms = len(np.unique(np.round(u, 9))) >= 3
    fits = [_solve(x, u, y, _starts(y), sign, share_terms) for sign in (1.0, -1.0)]
    params, _ = min(fits, key=lambda f: f[1])
    sign = 1.0 if params[1] >= 0 else -1.0
    fitted_y = law(params, x, u)
    resid = y - fitted_y
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        y_b = fitted_y + rng.choice(resid, size=len(y), replace=True)
        p_b, _ = _solve(x, u, y_b, [_refit_start(params)], sign, share_terms)
        samples.append(p_b)
    rmse = float(np.sqrt(np.mean((fitted_y / y - 1.0) ** 2)))
    names = NAMES if share_terms else ("E", "B", "b")
    return LawFit(params, np.array(samples) if samples else params[None, :], rmse, len(y), fitted=names)
