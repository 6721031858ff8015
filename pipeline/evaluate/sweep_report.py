"""What `strata sweep` shows of a plan: a terminal table and a PNG of the trade-off.

The table lists the swept values (and the recommended one, when it lies between them) with each
domain's predicted loss at the full budget and the largest old-domain rise. The PNG puts the
largest old-domain rise (y) against the mean new-domain loss (x): the fitted curve at the full
budget and at each proxy budget, the measured proxies as points on the curves of their budgets,
the tolerance as a line and the recommended value as a star.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.evaluate.report import _save
from pipeline.evaluate.sweep_plan import NEW, OLD, Plan, max_rise, new_loss


def table(plan: Plan) -> str:
    domains = list(plan.sweep.roles)
    head = f"{'value':>8} " + " ".join(f"{d[:12] + ('*' if plan.sweep.roles[d] == NEW else ''):>13}" for d in domains)
    lines = [head + f" {'old rise':>9}", "-" * (len(head) + 10)]
    values = sorted({m.value for m in plan.measured} | {plan.recommended})
    for v in values:
        row = f"{v:>8g} " + " ".join(f"{plan.predicted[v][d]:>13.4f}" for d in domains)
        mark = "  <- recommended" if v == plan.recommended else ""
        lines.append(row + f" {plan.rise(v):>+9.2%}{mark}")
    lines.append(f"(* the stage's own domains; predicted held-out loss at the full budget of "
                 f"{plan.sweep.full_tokens:,} tokens; tolerance {plan.sweep.tolerance:.1%})")
    if not plan.feasible:
        lines.append("no value keeps every old domain within the tolerance: recommended the one that forgets least")
    lines += [f"warning: {w}" for w in plan.warnings()]
    return "\n".join(lines)


def _curve(plan: Plan, x: float) -> tuple[list[float], list[float]]:
    """(mean new-domain loss, largest old-domain rise) along the grid at token fraction x."""
    news, rises = [], []
    for v in plan.grid:
        share = plan.sweep.share(v)
        losses = {d: float(f.predict(x, share[d])) for d, f in plan.fits.items()}
        news.append(new_loss(plan.sweep, losses))
        rises.append(max_rise(plan.sweep, losses))
    return news, rises


def plot(plan: Plan, out: Path) -> bool:
    """The trade-off PNG; False when the sweep has no old domain to plot a rise for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if OLD not in plan.sweep.roles.values():
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = plan.sweep.full_tokens
    for tokens in sorted({m.tokens for m in plan.measured}):
        line, = ax.plot(*_curve(plan, tokens / full), linewidth=1, alpha=0.6, label=f"fit at {tokens / full:.1%}")
        mine = [m for m in plan.measured if m.tokens == tokens]
        ax.scatter([new_loss(plan.sweep, m.loss) for m in mine], [max_rise(plan.sweep, m.loss) for m in mine],
                   color=line.get_color(), s=18)
    ax.plot(*_curve(plan, 1.0), color="black", linewidth=2, label="fit at the full budget")
    rec = plan.predicted[plan.recommended]
    ax.scatter([new_loss(plan.sweep, rec)], [max_rise(plan.sweep, rec)], marker="*", s=160, color="red", zorder=5,
               label=f"recommended {plan.recommended:g}")
    ax.axhline(plan.sweep.tolerance, color="red", linestyle="--", linewidth=0.8, label="tolerance")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set(xlabel="mean new-domain held-out loss", ylabel="largest old-domain rise",
           title=f"{plan.sweep.knob}: {min(plan.grid):g} .. {max(plan.grid):g}")
    return _save(fig, ax, Path(out))
