"""Continual-learning metrics from the evaluation matrix: AA, AIA, FGT, BWT, FWD.

The lifelong-learning survey Strata follows (arXiv 2406.06391) defines them on a matrix
`a[t][i]`: the score on domain i after stage t. Strata's domains are the recipe's sources, and a
stage may bring several of them, so the survey's "task j" becomes "the stage s(i) whose own
sources include domain i". `eval:` sets belong to no stage (s(i) = None) and enter none of the
metrics; they are reported beside them. With stages t = 0 .. T-1:

    seen(t) = {i : s(i) <= t}          old(t) = {i : s(i) < t}          new(t) = {i : 1 <= s(i) <= t}

    AA_t  = mean_{i in seen(t)} a[t][i]                                   average score so far
    AIA_t = mean_{k <= t} AA_k                                            average over the run so far
    FGT_t = mean_{i in old(t)} max_{s(i) <= l < t} (g[l][i] - g[t][i])     drop below the best since learned
    BWT_t = mean_{i in old(t)} (g[t][i] - g[s(i)][i])                      change since the domain was learned
    FWD_t = mean_{i in new(t)} (g[s(i)-1][i] - g0[i])                      gain before it was trained

`g` is the score turned "higher is better": g = a for accuracy, g = -a for a loss. So for every
measure FGT > 0 means forgotten (for a loss: the rise over the best loss the domain had since its
stage; negative when it kept improving), BWT > 0 means the old domains improved, FWD > 0 means
earlier stages helped a domain before its own stage. AA and AIA stay in the measure's own units (a mean loss,
lower is better; a mean accuracy, higher is better). The baseline g0 of FWD is the evaluation of
the initial model (before stage 0), or a from-scratch reference per domain when one is given.
A metric with nothing to average (FGT_0, BWT_0, FWD_0) is None.

The `pretraining:` sources were learned before stage 0: s(i) = -1, and row -1 of the matrix is
the initial model. They are old from stage 0 on, so FGT_0 and BWT_0 already measure forgetting of
the base model's general data (BWT_t = g[t][i] - g_init[i]); they have no FWD.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]
MEASURES = {"loss": False, "accuracy": True}  # measure -> higher is better


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cl_metrics(matrix: Matrix, stage_of: Sequence[int | None], higher_is_better: bool,
               initial: Sequence[float | None] | None = None,
               reference: Sequence[float | None] | None = None) -> dict[str, list[float | None]]:
    """AA, AIA, FGT, BWT, FWD after each stage (one value per row of `matrix`).

    matrix[t][i]: score on domain i after stage t (None where not evaluated); stage_of[i]: the stage
    that trains domain i, None for an evaluation-only set; initial[i]: the score of the initial
    model; reference[i]: a from-scratch reference for FWD, used instead of `initial` where given.
    """
    sign = 1.0 if higher_is_better else -1.0

    def g(t: int, i: int) -> float | None:
        value = matrix[t][i] if t >= 0 else (initial[i] if initial is not None else None)  # -1: before stage 0
        return None if value is None else sign * value

    def baseline(i: int) -> float | None:
        for source in (reference, initial):
            if source is not None and source[i] is not None:
                return sign * source[i]
        return None

    out: dict[str, list[float | None]] = {k: [] for k in ("AA", "AIA", "FGT", "BWT", "FWD")}
    for t, row in enumerate(matrix):
        seen = [i for i, s in enumerate(stage_of) if s is not None and s <= t]
        old = [i for i in seen if stage_of[i] < t]
        aa = _mean([row[i] for i in seen if row[i] is not None])  # pretraining domains count as seen
        out["AA"].append(aa)
        out["AIA"].append(_mean([v for v in out["AA"] if v is not None]))
        fgt, bwt, fwd = [], [], []
        for i in old:
            now, learned = g(t, i), g(stage_of[i], i)
            earlier = [v for v in (g(k, i) for k in range(stage_of[i], t)) if v is not None]
            if now is not None and earlier:
                fgt.append(max(earlier) - now)
            if now is not None and learned is not None:
                bwt.append(now - learned)
        for i in seen:
            if stage_of[i] >= 1:
                before, base = g(stage_of[i] - 1, i), baseline(i)
                if before is not None and base is not None:
                    fwd.append(before - base)
        out["FGT"].append(_mean(fgt))
        out["BWT"].append(_mean(bwt))
        out["FWD"].append(_mean(fwd))
    return out
