"""One training step, the same for every stage: grad_accum micro-batches, each forward once.

A method is a term of the objective or a mask over tokens, never a loop of its own (OLMo-core's
`TrainModule.train_batch` is the model):

    for each micro-batch:  t = objective.forward(model, batch)       per-token CE (+ KL, + balance)
                           mask = selection's mask of t, if any       RHO-1 (pipeline/train/selection.py)
                           loss = objective.loss(t, batch, mask)      CE over its tokens + balance
                                                                      + w T^2 KL over distill's tokens + penalty
                           backward(loss); after_backward(total)     the trainer's NaN guard steps the engine
    before the last after_backward: objective.before_step(engine)     ZeRO-3's penalty gradient (objectives.py)

With RHO-1 in `global_batch` scope the mask of every micro-batch needs the losses of all of them,
so the step first runs a no-grad forward over the first grad_accum - 1 micro-batches, then the
last one's training forward (its graph is kept and it is the first to go backward), ranks, and
then trains the others in order. That is the order of the forwards and backwards RHO-1 has always
had, so its selections and gradients are bit-identical to before it shared this step.

The logged loss is the mean over the global batch (all micro-batches, all ranks): the objective's
loss without a selection, the mean per-token CE over every valid token with one (the selection's
own metrics give the selected loss). Terms (ce, kl, penalty), the share of replayed samples and
the MoE router's statistics are logged beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.model.experts import router_metrics
from pipeline.model.loss import IGNORE
from pipeline.train.objectives import Objective, TokenLosses, TokenMask, mean_parts


@dataclass
class StepOutput:
    """What one step reports: the mean loss, the seconds spent waiting for data, more metrics."""

    loss: float
    data_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class Step:
    """The training step of a stage: its objective and, with `selection:`, its RHO-1 mask."""

    objective: Objective
    selection: Any = None  # pipeline/train/selection.py's Rho1, or None
    world_size: int = 1

    def __call__(self, engine: Any, stream: Any, device: torch.device,
                 after_backward: Callable[[torch.Tensor], None] | None = None) -> StepOutput:
        """grad_accum micro-batches, forward and backward each; `after_backward(total)` replaces
        `engine.step()` after each backward (`total`: this rank's running sum of the losses)."""
        after_backward = after_backward or (lambda total: engine.step())
        wait = time.perf_counter()
        cpu = [next(stream) for _ in range(stream.grad_accum)]
        batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in cpu]
        data_seconds = time.perf_counter() - wait
        rho1 = self.selection
        refs = rho1.references(cpu, batches) if rho1 is not None else []
        valid = [b["labels"] != IGNORE for b in batches]
        forwards: dict[int, TokenLosses] = {}
        masks: list[TokenMask | None] = [None] * len(batches)
        order = list(range(len(batches)))
        if rho1 is not None and rho1.scope == "global_batch":
            thetas = rho1.ranking_losses(engine, batches[:-1])
            last = len(batches) - 1
            forwards[last] = self.objective.forward(engine, batches[last], per_token=True)  # its graph is kept
            masks = rho1.global_masks([*thetas, forwards[last].ce.detach()], refs, valid)
            order = [last, *range(last)]
        else:
            thetas = []
        thetas += [None] * (len(batches) - len(thetas))  # global_batch: the ranking's, as ranked
        total = torch.zeros((), dtype=torch.float32, device=device)
        parts: dict[str, torch.Tensor] = {}
        own = sum(c.replay_of is None for c in stream.plan.mixture)  # replayed components come after these
        for i, m in enumerate(order):
            t = forwards.pop(m, None) or self.objective.forward(engine, batches[m], per_token=rho1 is not None)
            if rho1 is not None and masks[m] is None:
                masks[m] = rho1.micro_mask(t.ce, refs[m], valid[m])
            loss, terms = self.objective.loss(t, batches[m], masks[m])
            if own < len(stream.plan.mixture):  # the share of replayed samples, for the report's replay table
                terms = {**terms, "replay_share": (batches[m]["source"] >= own).float().mean()}
            parts = {k: parts.get(k, 0.0) + v for k, v in terms.items()}
            engine.backward(loss)  # DeepSpeed divides by grad_accum before accumulating
            total += loss.detach().float()
            if i == len(order) - 1:  # the step's last backward: the accumulation boundary
                self.objective.before_step(engine)  # ZeRO-3's penalty gradient, into the gradient partitions
            # engine.step() is a no-op except at the accumulation boundary, where the guard first
            # all-reduces `total` and skips the optimizer if the loss is NaN/inf on any rank.
            after_backward(total)
            if thetas[m] is None and t.per_token:
                thetas[m] = t.ce.detach()
        extra = mean_parts(parts, len(batches), self.world_size)  # ce, kl, penalty, replay_share
        if rho1 is None:
            mean = total.item() / (len(batches) * self.world_size)
        else:
            mean, selected = rho1.metrics(thetas, refs, valid, [m.mask for m in masks], cpu, device)
            extra.update(selected)
        return StepOutput(mean, data_seconds, {**extra, **router_metrics(engine)})  # MoE: balance and shares
