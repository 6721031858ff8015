"""The one training step (pipeline/train/step.py): RHO-1's token mask, distillation's KL, the EWC
penalty and replay compose in one step whose loss and gradient equal their formula by hand, and
`strata check` accepts the combination."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER, small_corpus
from test_objectives import VOCAB, batch, kl_by_hand, tiny

from pipeline.cli import main
from pipeline.recipe.forgetting import Distill, Regularize
from pipeline.recipe.spec import Selection
from pipeline.train.anchor import trainable
from pipeline.train.objectives import Distillation, Objective, Penalty
from pipeline.train.selection import Rho1, global_selection, select_top
from pipeline.train.step import Step

ACCUM = 2
W, T, R = 0.7, 2.0, 5.0  # distill weight and temperature, EWC weight


class Engine:
    """A plain module with what the step uses of a DeepSpeed engine: calling it, and a backward
    that divides by grad_accum as DeepSpeed's does."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / ACCUM).backward()

    def step(self) -> None:
        """The optimizer step: none here, the gradients are what the test reads."""


class Stream:
    """Two micro-batches of own (source 0) and replayed (sources 1, 2) rows, with sample indices."""

    grad_accum = ACCUM
    plan = SimpleNamespace(mixture=[SimpleNamespace(replay_of=r) for r in (None, "a", "b")])  # one own source

    def __init__(self):
        self.batches = [{**batch(), "index": torch.arange(4 * m, 4 * m + 4)} for m in range(ACCUM)]
        self.batches[1]["input_ids"] = self.batches[1]["input_ids"].flip(1)

    def __next__(self):
        return self.batches.pop(0)


class Scores:
    """Precomputed reference losses per sample (what ScoreStore.lookup gives)."""

    def __init__(self):
        self.refs = torch.rand(4 * ACCUM, 16, generator=torch.Generator().manual_seed(5)) * 4

    def lookup(self, index, labels):
        return self.refs[index]


@pytest.mark.parametrize("scope", ["global_batch", "micro_batch"])
def test_rho1_distill_ewc_and_replay_step_equals_its_formula_by_hand(scope):
    """loss = CE over RHO-1's selected tokens + w T^2 KL over the replayed rows + w/2 sum F (theta - theta*)^2."""
    student, teacher, scores = tiny(1), tiny(2).eval(), Scores()
    named = trainable(student)
    anchor = [p.detach() + 0.01 * torch.randn_like(p) for _, p in named]
    fisher = [torch.rand_like(p) for _, p in named]
    penalty = Penalty(Regularize(method="ewc", weight=R), [p for _, p in named], anchor, fisher)
    distill = Distillation(Distill(weight=W, temperature=T, on="replay"), teacher, own_sources=1)
    rho1 = Rho1(Selection(reference="ref", ratio=0.5, scope=scope), ["own", "old1", "old2"], 1, scores=scores)
    out = Step(Objective(distill, penalty), rho1)(Engine(student), Stream(), torch.device("cpu"))
    got = [p.grad.clone() for p in student.parameters()]

    # by hand, from the full logits of each micro-batch
    student.zero_grad()
    batches = Stream().batches
    logits = [student(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits for b in batches]
    with torch.no_grad():
        teacher_logits = [teacher(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits for b in batches]
    ce = [F.cross_entropy(s.reshape(-1, VOCAB), b["labels"].reshape(-1), ignore_index=-100, reduction="none")
          .view(4, 16) for s, b in zip(logits, batches)]
    valid = [b["labels"] != -100 for b in batches]
    excess = [c.detach() - scores.refs[b["index"]] for c, b in zip(ce, batches)]
    if scope == "global_batch":
        masks, k = global_selection(torch.stack(excess), torch.stack(valid), 0.5)
        selected = sum(c[m].sum() for c, m in zip(ce, masks)) / k
    else:
        masks = [select_top(e, v, 0.5) for e, v in zip(excess, valid)]
        selected = sum(c[m].sum() / m.sum() for c, m in zip(ce, masks)) / ACCUM
    replayed = [v & (b["source"] >= 1).unsqueeze(1) for v, b in zip(valid, batches)]
    kls = [kl_by_hand(s, t, keep, T) for s, t, keep in zip(logits, teacher_logits, replayed)]
    ewc = 0.5 * R * sum((f * (p - a) ** 2).sum() for (_, p), a, f in zip(named, anchor, fisher))
    # the KL's gradient by hand needs a differentiable KL: the same formula in torch, checked against kl_by_hand
    kl_terms = [(F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1)[keep].mean()
                for s, t, keep in zip(logits, teacher_logits, replayed)]
    for a, b in zip(kl_terms, kls):
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    total = selected + W * T ** 2 * sum(kl_terms) / ACCUM + ewc
    want = torch.autograd.grad(total, list(student.parameters()))
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, atol=2e-5, rtol=1e-4)
    assert out.extra["kl"] == pytest.approx(float(sum(kls)) / ACCUM, rel=1e-4) and out.extra["kl"] > 1e-3
    assert out.extra["penalty"] == pytest.approx(float(ewc), rel=1e-4) and out.extra["penalty"] > 0
    assert out.extra["ce"] == pytest.approx(float(selected), rel=1e-5)
    assert out.extra["selected_fraction"] == pytest.approx(0.5, abs=0.02)
    shares = [float((b["source"] >= 1).float().mean()) for b in batches]  # rows of replayed sources
    assert out.extra["replay_share"] == pytest.approx(sum(shares) / ACCUM) and 0 < out.extra["replay_share"] < 1
    mean_ce = sum(c[v].sum() for c, v in zip(ce, valid)) / sum(v.sum() for v in valid)
    assert out.loss == pytest.approx(float(mean_ce), rel=1e-5)  # the logged loss: over every valid token


def test_check_accepts_rho1_with_distill_regularize_and_replay(tmp_path, capsys):
    en, py = small_corpus(tmp_path, "en", 4), small_corpus(tmp_path, "code", 4)
    recipe = tmp_path / "combo.yaml"
    recipe.write_text(f"""\
name: combo
tokenizer: {TOKENIZER}
model:
  init: {{hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}
seq_len: 64
batch: {{micro: 2, global: 8}}
data: {{dir: {tmp_path / 'data'}}}
stages:
  - name: general
    tokens: 4096
    sources: [{{name: en, path: {en}}}]
    schedule: {{max_lr: 1.0e-3}}
  - name: code
    tokens: 4096
    sources: [{{name: py, path: {py}}}]
    schedule: {{max_lr: 1.0e-3}}
    replay: {{ratio: 0.25, from: [general]}}
    selection: {{method: rho1, ratio: 0.6, reference: general}}
    distill: {{teacher: previous, weight: 0.5}}
    regularize: {{method: l2, weight: 0.01}}
""")
    assert main(["check", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "also: selection" in out and "distill: teacher previous" in out and "regularize: l2" in out
    # the memory per rank of each extra copy: teacher and reference whole, theta* a float32 slice
    line = next(x for x in out.splitlines() if "stage 2 'code', extra copies" in x)
    assert "teacher:" in line and "reference:" in line and "anchor:" in line and "fisher" not in line
