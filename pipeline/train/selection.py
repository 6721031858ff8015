"""RHO-1 token selection (Lin et al. 2024, "Not All Tokens Are What You Need").

The model trains only on the tokens whose loss under the current model most exceeds their loss
under a reference model:

    excess(x_i) = L_theta(x_i) - L_ref(x_i)          (signed; detached: it only decides the mask)
    loss        = sum_{i selected} L_theta(x_i) / k   (k = round(ratio x number of real tokens))

Ignored labels (-100) never count: they are neither ranked nor in the token count. The top k is
exact (`select_top`): ties are broken by position, so the mask is a pure function of the numbers.

Two ranking scopes (recipe `selection.scope`):

* `global_batch` (default, the paper's): the top k of all tokens of the optimizer step, across
  accumulation steps and ranks. Every micro-batch's excess losses are needed before the first
  backward, so a step runs a no-grad forward of the model over its first grad_accum - 1
  micro-batches, all-gathers the excess losses of the whole global batch (4 bytes per token), ranks
  them, then runs the usual forward + backward per micro-batch (the last micro-batch's graph from
  the ranking pass is reused). Cost: (grad_accum - 1) extra forward passes per step, none when
  each rank has one micro-batch per step. The ranking is laid out in global sample order, so the
  mask does not depend on the world size.
* `micro_batch`: the top k within each micro-batch, from the forward pass that also trains: no
  extra pass, no communication; the threshold varies from micro-batch to micro-batch.

On an MoE model (pipeline/model/experts.py) each training forward's router balance term is added
to its micro-batch's selective loss, exactly as plain training adds it to the CE: the router
balances over every token it routes, selected or not. The step's metrics log it with the expert
shares.

Reference losses come from the online reference model (`online`: a no-grad forward on the same
micro-batch; the frozen model of pipeline/train/reference.py, partitioned under ZeRO-3) or from `strata score`
(`precomputed`, see pipeline/train/scoring.py). Both round them through float16 (the precomputed
storage format), so the two modes select exactly the same tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from pipeline.data.context import StageContext
from pipeline.data.loader import BatchStream
from pipeline.distributed import log
from pipeline.model.loss import token_losses
from pipeline.recipe.spec import Selection
from pipeline.train.objectives import TokenMask, selective_loss  # noqa: F401 (selective_loss: its formula)
from pipeline.train.reference import frozen_model_path, load_frozen, reference_losses
from pipeline.train.scoring import ScoreStore, reference_fingerprint, stream_fingerprint

LOG = log(__name__)


# -- pure functions ------------------------------------------------------------------------------
def selected_count(valid_tokens: int, ratio: float) -> int:
    """k: the number of tokens kept out of `valid_tokens` (rounded half up; at least 1 if any)."""
    if valid_tokens <= 0:
        return 0
    return min(valid_tokens, max(1, math.floor(ratio * valid_tokens + 0.5)))


def select_top(excess: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of exactly k = selected_count(valid.sum(), ratio) valid tokens of largest excess.

    Ties are broken by flat position (the earlier token wins), so the mask is deterministic.
    """
    flat = torch.where(valid.reshape(-1), excess.reshape(-1).float(), float("-inf"))
    k = selected_count(int(valid.sum()), ratio)
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[order[:k]] = True
    return mask.view(excess.shape)


def global_selection(excess: torch.Tensor, valid: torch.Tensor, ratio: float,
                     world_size: int = 1) -> tuple[torch.Tensor, int]:
    """Mask of this rank's tokens [A, B, L] from a ranking over the whole global batch, and k.

    The ranks' excess losses are all-gathered in rank order; since rank r holds the r-th
    contiguous slice of the global batch, that is the global sample order.
    """
    keyed = torch.where(valid, excess.float(), float("-inf")).contiguous()
    if world_size > 1:
        parts = [torch.empty_like(keyed) for _ in range(world_size)]
        dist.all_gather(parts, keyed)
        everything = torch.stack(parts)
        rank = dist.get_rank()
    else:
        everything, rank = keyed.unsqueeze(0), 0
    all_valid = torch.isfinite(everything)
    mask = select_top(everything, all_valid, ratio)
    return mask[rank], selected_count(int(all_valid.sum()), ratio)


# -- in the trainer -------------------------------------------------------------------------------
class Rho1:
    """RHO-1 for one stage: the reference losses and the token mask of each micro-batch of a step
    (the step itself is pipeline/train/step.py, the same for every stage); built once per stage."""

    def __init__(self, selection: Selection, sources: list[str], world_size: int,
                 reference: torch.nn.Module | None = None, scores: Any = None):
        if (reference is None) == (scores is None):
            raise ValueError("Rho1 needs exactly one of an online reference model or precomputed scores")
        self.ratio, self.scope = selection.ratio, selection.scope
        self.sources, self.world_size = sources, world_size
        self.reference, self.scores = reference, scores

    @classmethod
    def for_stage(cls, ctx: StageContext, stream: BatchStream) -> Rho1:
        """RHO-1 for the stage, from the stream the trainer built (its plan gives the mixture)."""
        sel = ctx.stage.selection
        path = frozen_model_path(ctx.recipe, ctx.index, ctx.run_dir, sel.reference, "selection.reference")
        sources = [c.source for c in stream.plan.mixture]
        if sel.scoring == "precomputed":
            store = ScoreStore.for_stage(ctx.recipe, ctx.index)
            store.check(stream_fingerprint(stream.plan, stream.state_dict()), reference_fingerprint(path),
                        ctx.recipe, ctx.index)
            LOG.info(f"RHO-1: precomputed reference losses from {store.folder}")
            return cls(sel, sources, ctx.world_size, scores=store)
        where = "partitioned (ZeRO-3)" if ctx.zero3_config else "replicated on every rank"
        LOG.info(f"RHO-1: online reference {path} ({where}, eval mode, no grad)")
        return cls(sel, sources, ctx.world_size, reference=load_frozen(path, ctx))

    def _reference_losses(self, cpu: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.scores is not None:
            return self.scores.lookup(cpu["index"], cpu["labels"]).to(batch["labels"].device)
        return reference_losses(self.reference, batch)

    def references(self, cpu: list[dict[str, torch.Tensor]], batches: list[dict[str, torch.Tensor]]
                   ) -> list[torch.Tensor]:
        """The reference losses of a step's micro-batches (`cpu`: as the stream gave them)."""
        return [self._reference_losses(c, b) for c, b in zip(cpu, batches)]

    def micro_mask(self, losses: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> TokenMask:
        """micro_batch scope: the top k of this micro-batch, from its training forward's losses."""
        return TokenMask(select_top(losses.detach() - ref, valid, self.ratio))

    def ranking_losses(self, engine: Any, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """global_batch scope: the model's per-token losses before any backward of the step (no grad)."""
        with torch.no_grad():
            return [token_losses(engine, b) for b in batches]

    def global_masks(self, thetas: list[torch.Tensor], refs: list[torch.Tensor],
                     valid: list[torch.Tensor]) -> list[TokenMask]:
        """global_batch scope: every micro-batch's mask from one ranking of the whole global batch.

        DeepSpeed divides each micro-batch loss by grad_accum and averages over ranks; the scale
        undoes both, so the step's gradient is that of sum(selected losses) / k over the global batch.
        """
        excess = torch.stack([t - r for t, r in zip(thetas, refs)])
        mask_all, count = global_selection(excess, torch.stack(valid), self.ratio, self.world_size)
        scale = len(thetas) * self.world_size
        return [TokenMask(m, count, scale) for m in mask_all]

    def metrics(self, thetas: list, refs: list, valid: list, masks: list, cpu: list,
                 device: torch.device) -> tuple[float, dict]:
        """(mean loss over every valid token of the global batch, the selection's metrics): global-batch
        sums, all-reduced once: the losses, the excess, and the selection per source."""
        n = len(self.sources)
        sums = torch.zeros(7 + 2 * n, dtype=torch.float64, device=device)
        for theta, ref, ok, mask, c in zip(thetas, refs, valid, masks, cpu):
            excess = (theta - ref).double()
            sel = mask & ok
            sums[0] += theta.double()[ok].sum()
            sums[1] += ok.sum()
            sums[2] += theta.double()[sel].sum()
            sums[3] += sel.sum()
            sums[4] += excess[ok].sum()
            sums[5] += excess[sel].sum()
            sums[6] += ref.double()[ok].sum()
            rows = c["source"].to(device) if "source" in c else torch.zeros(len(ok), dtype=torch.long, device=device)
            sums[7:7 + n] += torch.bincount(rows, weights=sel.sum(1).double(), minlength=n)[:n]
            sums[7 + n:] += torch.bincount(rows, weights=ok.sum(1).double(), minlength=n)[:n]
        if self.world_size > 1:
            dist.all_reduce(sums)
        s = sums.tolist()
        tokens, chosen = max(s[1], 1.0), max(s[3], 1.0)
        share = {name: (s[7 + i] / s[7 + n + i] if s[7 + n + i] else None) for i, name in enumerate(self.sources)}
        return s[0] / tokens, {
            "selected_fraction": s[3] / tokens, "selected_loss": s[2] / chosen, "excess_loss": s[4] / tokens,
            "excess_loss_selected": s[5] / chosen, "reference_loss": s[6] / tokens, "selected_share": share}
