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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.data.loader import BatchStream
from pipeline.model.experts import router_metrics
from pipeline.model.loss import token_losses, train_token_losses
from pipeline.recipe.spec import Recipe, Selection
from pipeline.train.reference import IGNORE, frozen_model_path, load_frozen, reference_losses
from pipeline.train.scoring import ScoreStore, reference_fingerprint, stream_fingerprint


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


def selective_loss(losses: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Sum of the selected tokens' losses over `count` (default: the number selected here).

    Unselected tokens contribute exactly zero gradient (torch.where, not a multiplication, so a
    non-finite loss on an unselected token cannot leak NaN into the step).
    """
    count = int(mask.sum()) if count is None else count
    return torch.where(mask, losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum() / max(count, 1)


def with_balance(loss: torch.Tensor, balance: torch.Tensor | None) -> torch.Tensor:
    """The selective loss plus an MoE model's router balance term (pipeline/model/experts.py): the
    router balances over all tokens of the micro-batch, selected or not, as in plain training."""
    return loss if balance is None else loss + balance


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
    """Runs one optimizer step with RHO-1 selection; built once per stage by the trainer."""

    def __init__(self, selection: Selection, sources: list[str], world_size: int,
                 reference: torch.nn.Module | None = None, scores: Any = None):
        if (reference is None) == (scores is None):
            raise ValueError("Rho1 needs exactly one of an online reference model or precomputed scores")
        self.ratio, self.scope = selection.ratio, selection.scope
        self.sources, self.world_size = sources, world_size
        self.reference, self.scores = reference, scores

    @classmethod
    def for_stage(cls, recipe: Recipe, index: int, stream: BatchStream, run_dir: Path, world_size: int,
                  device: torch.device, vocab_size: int, bf16: bool, verbose: bool = False,
                  zero3_config: dict | None = None) -> Rho1:
        """RHO-1 for stage `index`, from the stream the trainer built (its plan gives the mixture)."""
        sel = recipe.stages[index].selection
        path = frozen_model_path(recipe, index, run_dir, sel.reference, "selection.reference")
        sources = [c.source for c in stream.plan.mixture]
        if sel.scoring == "precomputed":
            store = ScoreStore.for_stage(recipe, index)
            store.check(stream_fingerprint(stream.plan, stream.state_dict()), reference_fingerprint(path),
                        recipe, index)
            if verbose:
                print(f"RHO-1: precomputed reference losses from {store.folder}", flush=True)
            return cls(sel, sources, world_size, scores=store)
        dtype = torch.bfloat16 if bf16 else torch.float32
        if verbose:
            where = "partitioned (ZeRO-3)" if zero3_config else "replicated on every rank"
            print(f"RHO-1: online reference {path} ({where}, eval mode, no grad)", flush=True)
        reference = load_frozen(path, recipe, vocab_size, device, dtype, zero3_config=zero3_config)
        return cls(sel, sources, world_size, reference=reference)

    def _reference_losses(self, cpu: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.scores is not None:
            return self.scores.lookup(cpu["index"], cpu["labels"]).to(batch["labels"].device)
        return reference_losses(self.reference, batch)

    def run_step(self, engine: Any, stream: Any, device: torch.device,
                 step: Any = None) -> tuple[float, dict]:
        """grad_accum micro-batches: forward, select, backward; returns (mean loss, metrics).

        `step(total)` replaces `engine.step()` after each backward (the trainer's NaN guard; `total`
        is this rank's running sum of micro-batch losses).
        """
        step = step or (lambda total: engine.step())
        accum = stream.grad_accum
        total = torch.zeros((), dtype=torch.float32, device=device)
        cpu = [next(stream) for _ in range(accum)]
        batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in cpu]
        refs = [self._reference_losses(c, b) for c, b in zip(cpu, batches)]
        valid = [b["labels"] != IGNORE for b in batches]
        thetas: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        if self.scope == "micro_batch":
            for b, ref, ok in zip(batches, refs, valid):
                losses, balance = train_token_losses(engine, b)
                mask = select_top(losses.detach() - ref, ok, self.ratio)
                loss = with_balance(selective_loss(losses, mask), balance)
                engine.backward(loss)  # DeepSpeed averages over micro-batches and ranks
                total += loss.detach()
                step(total)
                thetas.append(losses.detach())
                masks.append(mask)
        else:
            with torch.no_grad():  # ranking pass: the model's losses before any backward of this step
                thetas = [token_losses(engine, b) for b in batches[:-1]]
            last, last_balance = train_token_losses(engine, batches[-1])  # its graph is kept for the first backward
            thetas.append(last.detach())
            excess = torch.stack([t - r for t, r in zip(thetas, refs)])
            mask_all, count = global_selection(excess, torch.stack(valid), self.ratio, self.world_size)
            masks = list(mask_all)
            # DeepSpeed divides each micro-batch loss by grad_accum and averages over ranks; undo
            # both so the step's gradient is that of sum(selected losses) / k over the global batch.
            # An MoE model's balance term is per micro-batch, like plain training's: not undone.
            for m in [accum - 1, *range(accum - 1)]:
                losses, balance = (last, last_balance) if m == accum - 1 else train_token_losses(engine, batches[m])
                loss = with_balance(selective_loss(losses, masks[m], count) * (accum * self.world_size), balance)
                engine.backward(loss)
                total += loss.detach()
                step(total)
        loss, metrics = self._metrics(thetas, refs, valid, masks, cpu, device)
        return loss, {**metrics, **router_metrics(engine)}  # MoE: balance loss and expert shares

    def _metrics(self, thetas: list, refs: list, valid: list, masks: list, cpu: list,
                 device: torch.device) -> tuple[float, dict]:
        """Global-batch sums, all-reduced once: the losses, the excess, and the selection per source."""
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
