"""What a stage minimises, one micro-batch at a time: CE, plus distillation, plus a weight penalty.

The trainer's step asks its `Objective` for the loss of each micro-batch and back-propagates it;
plain training, distillation (LwF) and weight regularisation (L2, EWC) are the same step with
different terms, not branches in the loop:

    loss = CE                                                      (plain; model/build.py's causal_lm_loss)
         + w_d * T^2 * mean_{tokens it applies to} KL(softmax(teacher / T) || softmax(student / T))
         + w_r / 2 * sum_i F_i (theta_i - theta*_i)^2              (F_i = 1 for l2; the Fisher for ewc)

The KL is averaged over the micro-batch's valid tokens (`on: all`) or over the tokens of rows
drawn from replayed sources (`on: replay`; the stream's `source` column is the row's position in
the stage's mixture, and replayed components come after the stage's own sources). A micro-batch
without such tokens adds zero.

The penalty is added to every micro-batch's loss: DeepSpeed divides each by grad_accum and
averages over ranks, so the step's gradient carries it exactly once. Only trainable parameters are
penalised (frozen ones, `expand.freeze_old`, have no penalty). theta* and F are written to the
stage's folder at the stage start (pipeline/train/anchor.py) and read back on resume, so a resumed
run computes the same penalty as one that never stopped. Under ZeRO-3, where a parameter is whole
only inside its module's forward and backward, the penalty is computed from this rank's float32
master partition without a graph and its gradient is added to the gradient partition once per
step, before the optimizer step (`PartitionedPenalty`, `Objective.before_step`).

The teacher (pipeline/train/reference.py) runs under no_grad in eval mode and is never updated.
Neither the student's nor the teacher's full float32 logits are ever held: `Distillation.losses`
computes both heads, the CE and the KL chunk by chunk (pipeline/model/loss.py's `chunked`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.data.context import StageContext
from pipeline.model.loss import (
    IGNORE,
    causal_lm_loss,
    chunk_tokens,
    chunked,
    hidden_and_head,
    hidden_head_and_balance,
    token_ce,
    train_token_losses,
)
from pipeline.recipe.forgetting import Distill, Regularize
from pipeline.train.anchor import stage_anchor
from pipeline.train.features import capture, compared_layers, decoder_layers, feature_term
from pipeline.train.reference import frozen_model_path, load_frozen


def token_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token KL(softmax(teacher/T) || softmax(student/T)) of logits [..., V], in float32."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `per_token` over the masked tokens; 0 when none are masked (torch.where: an unmasked
    token's value, even a non-finite one, never reaches the result or its gradient)."""
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    return torch.where(mask, per_token, zero).sum() / mask.sum().clamp(min=1)


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """mean over masked tokens of KL(softmax(teacher/T) || softmax(student/T)), from full logits
    (the definition; training computes the same chunk by chunk, `Distillation.losses`)."""
    return masked_mean(token_kl(student, teacher, temperature), mask)


@dataclass
class Distillation:
    """LwF against a frozen teacher: the KL term of the loss, from the student's one forward pass.

    Memory-lean like the plain loss (pipeline/model/loss.py): student and teacher run up to their
    last hidden states, and both heads, the CE and the KL are computed one chunk of tokens at a
    time (`chunked`: the student's chunk is recomputed in the backward), so neither model's full
    float32 logits exist; the teacher's hidden states ride along as a per-token argument.
    """

    spec: Distill
    teacher: Any  # a frozen model (or an optimizer-less DeepSpeed engine under ZeRO-3)
    own_sources: int  # rows whose `source` is >= this are replayed samples

    def token_losses(self, model: Any, batch: dict[str, torch.Tensor], chunk: int | None = None) -> TokenLosses:
        """Per-token CE and KL [B, L] of one micro-batch (both keep the student's graph), an MoE
        student's router balance term (None if dense) and, with `features:`, the hidden-state
        term (pipeline/train/features.py) over the KL's tokens: one forward of each model."""
        f = self.spec.features
        layers = compared_layers(f, len(decoder_layers(self.teacher))) if f is not None else []
        with capture(model, layers) as student_features:
            hidden, head, balance = hidden_head_and_balance(model, batch)
        with torch.no_grad(), capture(self.teacher, layers) as teacher_features:
            teacher_hidden, teacher_head = hidden_and_head(self.teacher, batch)
        temperature = self.spec.temperature

        def ce_and_kl(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher = teacher_head(teacher)
            return torch.stack([token_ce(student, labels), token_kl(student, teacher, temperature)], dim=-1)

        if chunk is None:  # a chunk holds about eight [tokens x vocab] float32 tensors here, not two
            chunk = max(16, chunk_tokens(getattr(head, "out_features", None) or hidden.shape[-1]) // 4)
        per_token = chunked(hidden, head, ce_and_kl, batch["labels"], teacher_hidden, chunk=chunk)
        features = feature_term(student_features, teacher_features, self.kl_mask(batch), f.loss) if f else None
        return TokenLosses(per_token[..., 0], per_token[..., 1], balance, features)

    def kl_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tokens the KL applies to: every valid one (`on: all`), or those of replayed rows."""
        mask = batch["labels"] != IGNORE
        if self.spec.on == "replay":
            mask = mask & (batch["source"] >= self.own_sources).unsqueeze(1)
        return mask

    def losses(self, model: Any, batch: dict[str, torch.Tensor],
               chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE, KL) of one micro-batch; both keep the student's graph. The CE includes an MoE
        student's router balance term, as the plain loss does."""
        t = self.token_losses(model, batch, chunk)
        ce = t.ce.sum() / (batch["labels"] != IGNORE).sum()
        return (ce if t.balance is None else ce + t.balance), masked_mean(t.kl, self.kl_mask(batch))


@dataclass
class Penalty:
    """w/2 * sum_i F_i (theta_i - theta*_i)^2 over the trainable parameters (F = 1 for l2).

    With `slices` each rank holds theta* and F of its part of the parameters only (train/anchor.py's
    `Anchor`) and adds `scale` (the world size) times its part's penalty: DeepSpeed averages the
    gradients over the ranks, so the step's gradient carries the whole penalty exactly once, and
    the logged penalty (averaged over ranks) is the whole penalty.
    """

    spec: Regularize
    params: list[torch.nn.Parameter]  # the trainable parameters, in the order of `anchor`
    anchor: list[torch.Tensor]  # theta* (of this rank's slice of each parameter, flattened), float32, never updated
    fisher: list[torch.Tensor] | None  # ewc only
    slices: list[tuple[int, int]] | None = None  # this rank's [lo, hi) of each flattened parameter; None: all
    scale: int = 1

    @classmethod
    def of(cls, spec: Regularize, anchor: Any) -> Penalty:
        """The penalty of a stage from its `Anchor` (pipeline/train/anchor.py); under ZeRO-3 the
        `PartitionedPenalty` of ZeRO-3's own partitions."""
        kind = PartitionedPenalty if anchor.partitioned else cls
        return kind(spec, anchor.params, anchor.theta, anchor.fisher, anchor.slices, anchor.scale)

    def add_gradient(self, engine: Any) -> None:
        """Nothing to add: this penalty's gradient comes through autograd with the loss's."""

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.anchor[0].device if self.anchor else None)
        for k, (p, a) in enumerate(zip(self.params, self.anchor)):
            if self.slices is not None:
                lo, hi = self.slices[k]
                if hi == lo:
                    continue
                p = p.reshape(-1)[lo:hi]
            sq = (p.float() - a).pow(2)
            total = total + (sq * self.fisher[k] if self.fisher is not None else sq).sum()
        return 0.5 * self.spec.weight * total * self.scale


@dataclass
class PartitionedPenalty(Penalty):
    """The same penalty under ZeRO-3, where a parameter is whole only inside its module's forward.

    `slices` are ZeRO-3's partitions of the parameters (pipeline/train/anchor.py's
    `partition_range`), theta* and F this rank's parts of them. theta is read from this rank's
    float32 master weights (the ones the optimizer updates), never from the gathered module:

      value     w/2 * sum_{this partition} F (theta - theta*)^2 times the world size, without a
                graph (the ranks' mean, which the step logs, is the whole penalty; added to each
                micro-batch's loss, as the autograd penalty is, it changes no gradient);
      gradient  `add_gradient`, once per step after the last micro-batch's backward and before
                `engine.step()`: w * F * (theta - theta*) added to this rank's gradient partition,
                which already holds the micro-batches' CE gradients divided by grad_accum and
                averaged over the ranks, so the step sees the whole penalty's gradient exactly
                once, as the autograd path's does (times the loss scale of fp16; 1 for bf16 and
                fp32). Gradient clipping and the NaN guard see it, since the step reads this buffer.
    """

    def partitions(self) -> Iterator[tuple[int, torch.nn.Parameter, torch.Tensor]]:
        """(k, parameter, its float32 master weights on this rank) for each non-empty partition."""
        from deepspeed.utils import safe_get_local_fp32_param

        for k, p in enumerate(self.params):
            lo, hi = self.slices[k]
            if hi > lo:
                yield k, p, safe_get_local_fp32_param(p).reshape(-1)[: hi - lo]

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.anchor[0].device if self.anchor else None)
        for k, _, theta in self.partitions():
            sq = (theta.float() - self.anchor[k]).pow(2)
            total = total + (sq * self.fisher[k] if self.fisher is not None else sq).sum()
        return 0.5 * self.spec.weight * total * self.scale

    @torch.no_grad()
    def add_gradient(self, engine: Any) -> None:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        loss_scale = float(getattr(engine.optimizer, "loss_scale", 1.0))
        for k, p, theta in self.partitions():
            d = theta.float() - self.anchor[k]
            step = self.spec.weight * (d * self.fisher[k] if self.fisher is not None else d)
            grad = safe_get_local_grad(p).clone()
            flat = grad.view(-1)
            flat[: d.numel()] += (step * loss_scale).to(grad.dtype)
            safe_set_local_grad(p, grad)


def selective_loss(losses: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Sum of the masked tokens' losses over `count` (default: the number masked here).

    Unmasked tokens contribute exactly zero gradient (torch.where, not a multiplication, so a
    non-finite loss on an unselected token cannot leak NaN into the step).
    """
    count = int(mask.sum()) if count is None else count
    return torch.where(mask, losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum() / max(count, 1)


@dataclass
class TokenLosses:
    """One micro-batch's training forward: what every term of its loss is computed from."""

    ce: torch.Tensor  # per-token CE [B, L] with its graph; or, when no term needs tokens, the mean CE + balance
    kl: torch.Tensor | None = None  # per-token KL [B, L] against the teacher (distill)
    balance: torch.Tensor | None = None  # an MoE router's balance term, not yet in a per-token `ce`
    features: torch.Tensor | None = None  # distill's hidden-state term (features:), already a mean

    @property
    def per_token(self) -> bool:
        return self.ce.dim() > 0


@dataclass(frozen=True)
class TokenMask:
    """A selection's share of the step (RHO-1, pipeline/train/selection.py): the CE term becomes
    sum_{mask} CE / count * scale instead of the mean over all valid tokens."""

    mask: torch.Tensor  # [B, L] bool
    count: int | None = None  # k of the whole ranking; None: the number masked in this micro-batch
    scale: int = 1  # global-batch scope: grad_accum x world size, undoing DeepSpeed's averaging


@dataclass
class Objective:
    """The loss of one micro-batch as a sum of terms, and its parts for the log; the trainer's one
    step (pipeline/train/step.py) asks it for `forward` and `loss` of every micro-batch:

        loss = CE over its tokens (all valid ones, or a selection's mask) + MoE balance
             + w_d T^2 * KL over the distillation's tokens + penalty
    """

    distillation: Distillation | None = None
    penalty: Penalty | None = None

    def forward(self, model: Any, batch: dict[str, torch.Tensor], per_token: bool = False) -> TokenLosses:
        """The training forward of a micro-batch; per-token CE when a mask will apply (`per_token`)
        or a term needs it, else the memory-lean mean CE (model/loss.py's `causal_lm_loss`)."""
        if self.distillation is not None:
            return self.distillation.token_losses(model, batch)
        if per_token:
            ce, balance = train_token_losses(model, batch)
            return TokenLosses(ce, None, balance)
        return TokenLosses(causal_lm_loss(model, batch))

    def loss(self, t: TokenLosses, batch: dict[str, torch.Tensor],
             select: TokenMask | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss from its forward `t`, each term over the tokens it applies to."""
        if select is not None:
            ce = selective_loss(t.ce, select.mask, select.count) * select.scale
        elif t.per_token:
            ce = t.ce.sum() / (batch["labels"] != IGNORE).sum()
        else:
            ce = t.ce
        ce = ce if t.balance is None else ce + t.balance
        loss, parts = ce, {}
        if t.kl is not None:
            d = self.distillation.spec
            kl = masked_mean(t.kl, self.distillation.kl_mask(batch))
            loss = ce + d.weight * d.temperature ** 2 * kl
            parts["kl"] = kl.detach()
            if t.features is not None:  # feature regularisation (pipeline/train/features.py)
                loss = loss + d.features.weight * t.features
                parts["features"] = t.features.detach()
        if self.penalty is not None:
            penalty = self.penalty()
            loss = loss + penalty
            parts["penalty"] = penalty.detach()
        if parts:
            parts["ce"] = ce.detach().float()
        return loss, parts

    def before_step(self, engine: Any) -> None:
        """After the last micro-batch's backward, before `engine.step()`: gradients that do not come
        through autograd (ZeRO-3's penalty, `PartitionedPenalty.add_gradient`)."""
        if self.penalty is not None:
            self.penalty.add_gradient(engine)

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a micro-batch without a selection."""
        return self.loss(self.forward(model, batch), batch)


def mean_parts(sums: dict[str, torch.Tensor], count: int, world_size: int) -> dict[str, float]:
    """Per-step means of the summed micro-batch parts over all micro-batches of all ranks."""
    if not sums:
        return {}
    names = sorted(sums)
    stacked = torch.stack([sums[n].float() for n in names])
    if world_size > 1:
        dist.all_reduce(stacked)
    return {n: v / (count * world_size) for n, v in zip(names, stacked.tolist())}


def stage_objective(ctx: StageContext, model: torch.nn.Module) -> tuple[Objective, list[str]]:
    """The objective of the stage (`model` is the trained module, as the stage starts or resumes)
    and lines for the log saying what it adds to the CE."""
    stage, notes = ctx.stage, []
    objective = Objective()
    if stage.distill is not None:
        d = stage.distill
        path = frozen_model_path(ctx.recipe, ctx.index, ctx.run_dir, d.teacher, "distill.teacher")
        objective.distillation = Distillation(d, load_frozen(path, ctx), own_sources=len(stage.sources))
        where = "partitioned (ZeRO-3)" if ctx.zero3_config else "replicated on every rank"
        notes.append(f"distilling from {path or 'the initial model'} ({where}, eval mode, no grad): "
                     f"CE + {d.weight:g} * {d.temperature:g}^2 * KL on {d.on} tokens"
                     + (f" + {d.features.weight:g} * {d.features.loss} of hidden states" if d.features else ""))
    if stage.regularize is not None:
        r = stage.regularize
        anchor = stage_anchor(model, ctx)
        objective.penalty = Penalty.of(r, anchor)
        fisher = anchor.fisher is not None
        notes.append(f"{r.method} penalty {r.weight:g}/2 * sum {'F ' if fisher else ''}(theta - theta*)^2 over "
                     f"{anchor.weights:,} trainable weights ({'computed' if ctx.fresh else 'read'}: "
                     f"{'theta*' + (' and F' if fisher else '')}; this rank holds {anchor.bytes / 2**20:,.1f} MiB of "
                     f"them, 1/{anchor.scale} of the weights)")
    return objective, notes
