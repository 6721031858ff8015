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
run computes the same penalty as one that never stopped.

The teacher (pipeline/train/reference.py) runs under no_grad in eval mode and is never updated.
Neither the student's nor the teacher's full float32 logits are ever held: `Distillation.losses`
computes both heads, the CE and the KL chunk by chunk (pipeline/model/loss.py's `chunked`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.model.loss import (
    IGNORE,
    causal_lm_loss,
    chunk_tokens,
    chunked,
    hidden_and_head,
    hidden_head_and_balance,
    token_ce,
)
from pipeline.recipe.forgetting import Distill, Regularize
from pipeline.recipe.spec import Recipe
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

    def losses(self, model: Any, batch: dict[str, torch.Tensor],
               chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE, KL) of one micro-batch; both keep the student's graph. The CE includes an MoE
        student's router balance term, as the plain loss does."""
        terms = self.terms(model, batch, chunk)
        return terms["ce"], terms["kl"]

    def terms(self, model: Any, batch: dict[str, torch.Tensor], chunk: int | None = None) -> dict[str, torch.Tensor]:
        """ce, kl and (with `features:`) the hidden-state term (pipeline/train/features.py), from
        one forward of each model."""
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

        labels = batch["labels"]
        if chunk is None:  # a chunk holds about eight [tokens x vocab] float32 tensors here, not two
            chunk = max(16, chunk_tokens(getattr(head, "out_features", None) or hidden.shape[-1]) // 4)
        per_token = chunked(hidden, head, ce_and_kl, labels, teacher_hidden, chunk=chunk)
        mask = labels != IGNORE
        ce = per_token[..., 0].sum() / mask.sum()
        if self.spec.on == "replay":
            mask = mask & (batch["source"] >= self.own_sources).unsqueeze(1)
        out = {"ce": ce if balance is None else ce + balance, "kl": masked_mean(per_token[..., 1], mask)}
        if f is not None:
            out["features"] = feature_term(student_features, teacher_features, mask, f.loss)
        return out


@dataclass
class Penalty:
    """w/2 * sum_i F_i (theta_i - theta*_i)^2 over the trainable parameters (F = 1 for l2)."""

    spec: Regularize
    params: list[torch.nn.Parameter]  # the trainable parameters, in the order of `anchor`
    anchor: list[torch.Tensor]  # theta*, float32, never updated
    fisher: list[torch.Tensor] | None  # ewc only

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.anchor[0].device if self.anchor else None)
        for k, (p, a) in enumerate(zip(self.params, self.anchor)):
            sq = (p.float() - a).pow(2)
            total = total + (sq * self.fisher[k] if self.fisher is not None else sq).sum()
        return 0.5 * self.spec.weight * total


@dataclass
class Objective:
    """The loss of one micro-batch and its parts for the log; the trainer's one step interface."""

    distillation: Distillation | None = None
    penalty: Penalty | None = None

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.distillation is None and self.penalty is None:
            return causal_lm_loss(model, batch), {}
        parts: dict[str, torch.Tensor] = {}
        if self.distillation is not None:
            terms = self.distillation.terms(model, batch)
            d, ce, kl = self.distillation.spec, terms["ce"], terms["kl"]
            loss = ce + d.weight * d.temperature ** 2 * kl
            parts["kl"] = kl.detach()
            if "features" in terms:  # feature regularisation (pipeline/train/features.py)
                loss = loss + d.features.weight * terms["features"]
                parts["features"] = terms["features"].detach()
        else:
            loss = ce = causal_lm_loss(model, batch)
        parts["ce"] = ce.detach().float()
        if self.penalty is not None:
            penalty = self.penalty()
            loss = loss + penalty
            parts["penalty"] = penalty.detach()
        return loss, parts


def mean_parts(sums: dict[str, torch.Tensor], count: int, world_size: int) -> dict[str, float]:
    """Per-step means of the summed micro-batch parts over all micro-batches of all ranks."""
    if not sums:
        return {}
    names = sorted(sums)
    stacked = torch.stack([sums[n].float() for n in names])
    if world_size > 1:
        dist.all_reduce(stacked)
    return {n: v / (count * world_size) for n, v in zip(names, stacked.tolist())}


def stage_objective(recipe: Recipe, index: int, run_dir: Path, model: torch.nn.Module, fresh: bool,
                    device: torch.device, dtype: torch.dtype, tokenizer: Any, rank: int = 0, world_size: int = 1,
                    zero3_config: dict | None = None) -> tuple[Objective, list[str]]:
    """The objective of stage `index` (`model` is the trained module, as the stage starts or
    resumes) and lines for the log saying what it adds to the CE."""
    stage, notes = recipe.stages[index], []
    objective = Objective()
    if stage.distill is not None:
        d = stage.distill
        path = frozen_model_path(recipe, index, run_dir, d.teacher, "distill.teacher")
        teacher = load_frozen(path, recipe, tokenizer.vocab_size, device, dtype, tokenizer.eos_id, zero3_config)
        objective.distillation = Distillation(d, teacher, own_sources=len(stage.sources))
        where = "partitioned (ZeRO-3)" if zero3_config else "replicated on every rank"
        notes.append(f"distilling from {path or 'the initial model'} ({where}, eval mode, no grad): "
                     f"CE + {d.weight:g} * {d.temperature:g}^2 * KL on {d.on} tokens"
                     + (f" + {d.features.weight:g} * {d.features.loss} of hidden states" if d.features else ""))
    if stage.regularize is not None:
        r = stage.regularize
        params, theta, fisher = stage_anchor(model, recipe, index, run_dir, fresh, device, rank, world_size)
        objective.penalty = Penalty(r, params, theta, fisher)
        notes.append(f"{r.method} penalty {r.weight:g}/2 * sum {'F ' if fisher else ''}(theta - theta*)^2 over "
                     f"{sum(t.numel() for t in theta):,} trainable weights ({'computed' if fresh else 'read'}: "
                     f"{'theta*' + (' and F' if fisher else '')})")
    return objective, notes
