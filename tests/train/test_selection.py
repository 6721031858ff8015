"""RHO-1 token selection: the exact top-k, the loss and its gradient, precomputed vs online scores,
stale scores, and (end to end under torchrun) resume mid-stage with selection."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import recipe_dict, small_corpus, step_metrics, strata, write_recipe

from pipeline.cli import main
from pipeline.data.context import StageContext
from pipeline.data.stream import StageStream
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import StrataError
from pipeline.model.build import build_model
from pipeline.recipe.load import load_recipe
from pipeline.recipe.spec import Selection
from pipeline.train.objectives import Objective
from pipeline.train.reference import frozen_model_path, reference_losses
from pipeline.train.scoring import ScoreStore, reference_fingerprint, score_stage, stream_fingerprint
from pipeline.train.selection import (
    Rho1,
    global_selection,
    select_top,
    selected_count,
    selective_loss,
)
from pipeline.train.step import Step

STEPS = 4


def stage_context(recipe, run_dir, plan=None) -> StageContext:
    """The first stage of `recipe` in one process on the CPU, its frozen models found in `run_dir`."""
    return dataclasses.replace(StageContext.single_process(recipe, 0, plan), run_dir=Path(run_dir))


def reference_path(recipe, index, run_dir):
    return frozen_model_path(recipe, index, run_dir, recipe.stages[index].selection.reference, "selection.reference")


# -- the selection itself --------------------------------------------------------------------------
def test_selection_keeps_exactly_the_top_k_tokens_by_excess_loss():
    excess = torch.tensor([[0.5, 3.0, -1.0, 2.0, 9.0],
                           [1.0, 1.0, 7.0, -2.0, 4.0]])
    valid = torch.ones_like(excess, dtype=torch.bool)
    valid[0, 4] = False  # an ignored label (-100): never selected, never counted, whatever its loss
    # 9 real tokens, ratio 0.5 -> k = round(4.5) = 5: 7, 4, 3, 2 and the first of the two 1.0s
    mask = select_top(excess, valid, 0.5)
    want = torch.tensor([[False, True, False, True, False],
                         [True, False, True, False, True]])
    assert torch.equal(mask, want)
    assert selected_count(9, 0.5) == 5 and selected_count(9, 1.0) == 9 and selected_count(0, 0.6) == 0
    assert select_top(excess, valid, 1.0).sum() == 9 and not select_top(excess, valid, 1.0)[0, 4]
    assert select_top(excess, valid, 0.01).sum() == 1  # at least one token when there are any


def test_global_scope_ranks_all_micro_batches_together():
    excess = torch.tensor([[[5.0, 4.0], [3.0, 2.0]],     # micro-batch 0: all large
                           [[-1.0, -2.0], [-3.0, 0.0]]])  # micro-batch 1: all small
    valid = torch.ones_like(excess, dtype=torch.bool)
    mask, k = global_selection(excess, valid, 0.5)
    assert k == 4 and mask[0].all() and not mask[1].any()
    # per micro-batch, each would have kept its own top half instead
    assert select_top(excess[1], valid[1], 0.5).sum() == 2


def test_loss_is_averaged_over_selected_tokens_only():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[False, True, False], [True, False, True]])
    assert selective_loss(losses, mask).item() == pytest.approx((2 + 4 + 6) / 3)
    assert selective_loss(losses, mask, count=6).item() == pytest.approx(12 / 6)  # the global k


def test_unselected_tokens_get_exactly_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[1, 5] = -100
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100,
                                               reduction="none").view(2, 6)
    losses = losses.clone()
    losses.data[0, 0] = float("inf")  # even a non-finite loss on an unselected token must not leak
    reference = torch.rand(2, 6)
    mask = select_top(losses.detach().nan_to_num(posinf=-1e9) - reference, labels != -100, 0.4)
    selective_loss(losses, mask).backward()
    per_token = logits.grad.abs().sum(-1)
    assert torch.all(per_token[~mask] == 0)
    assert torch.all(per_token[mask] > 0)
    assert not mask[1, 5] and not mask[0, 0]


class _Batches:
    """One optimizer step's micro-batches, as a stream hands them out."""

    plan = SimpleNamespace(mixture=[SimpleNamespace(replay_of=None)])  # own sources only: no replay share

    def __init__(self, batches):
        self.grad_accum, self._it = len(batches), iter(batches)

    def __next__(self):
        return next(self._it)


class _Scores:
    """Precomputed reference losses of each global sample (what ScoreStore.lookup gives)."""

    def __init__(self, refs):
        self.refs = refs

    def lookup(self, index, labels):
        return self.refs[index]


class _DeepSpeedLike:
    """A plain module with what RHO-1's step uses of a DeepSpeed engine: `.module`, and a backward
    that divides by grad_accum as DeepSpeed's does."""

    def __init__(self, model, accum):
        self.module, self.accum = model, accum

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        pass


@pytest.mark.parametrize("scope", ["global_batch", "micro_batch"])
def test_moe_balance_loss_is_part_of_the_rho1_step(scope):
    """On an MoE stage the RHO-1 step's gradient is that of the selective loss plus the router's
    balance term of every micro-batch, as plain training's is CE plus it; the metrics log it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.model.experts import upcycle

    vocab, accum = 50, 2
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, use_cache=False))
    model = upcycle(dense, experts=4, top_k=2, aux_loss_coef=0.5, seed=1)
    g = torch.Generator().manual_seed(0)
    batches = []
    for m in range(accum):
        ids = torch.randint(0, vocab, (2, 17), generator=g)
        labels = ids[:, 1:].clone()
        labels[m, :4] = -100
        batches.append({"input_ids": ids[:, :-1], "labels": labels, "position_ids": torch.arange(16).repeat(2, 1),
                        "index": torch.tensor([2 * m, 2 * m + 1]), "source": torch.tensor([0, 1])})
    refs = torch.rand(2 * accum, 16, generator=g) * 4
    rho1 = Rho1(Selection(reference="ref", ratio=0.5, scope=scope), ["a", "b"], 1, scores=_Scores(refs))
    extra = Step(Objective(), rho1)(_DeepSpeedLike(model, accum), _Batches(batches), torch.device("cpu")).extra
    got = [p.grad.clone() for p in model.parameters()]
    # by hand, from the full logits and the model's own aux_loss
    model.zero_grad()
    outs = [model(input_ids=b["input_ids"], position_ids=b["position_ids"]) for b in batches]
    losses = [F.cross_entropy(o.logits.reshape(-1, vocab), b["labels"].reshape(-1), ignore_index=-100,
                              reduction="none").view(2, 16) for o, b in zip(outs, batches)]
    valid = [b["labels"] != -100 for b in batches]
    if scope == "global_batch":
        excess = torch.stack([t.detach() - refs[b["index"]] for t, b in zip(losses, batches)])
        masks, k = global_selection(excess, torch.stack(valid), 0.5)
        selective = sum(selective_loss(t, m, k) for t, m in zip(losses, masks))
    else:
        selective = sum(selective_loss(t, select_top(t.detach() - refs[b["index"]], ok, 0.5))
                        for t, b, ok in zip(losses, batches, valid)) / accum
    balance = sum(0.5 * o.aux_loss for o in outs) / accum
    params = list(model.parameters())
    want = torch.autograd.grad(selective + balance, params, retain_graph=True)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)
    router = [i for i, (n, _) in enumerate(model.named_parameters()) if n.endswith("mlp.gate.weight")]
    without = torch.autograd.grad(selective, params, allow_unused=True)
    assert all((want[i] - without[i]).abs().max() > 1e-4 for i in router)  # the term moves the routers
    assert extra["balance_loss"] == pytest.approx(float(sum(o.aux_loss.detach() for o in outs)) / accum, rel=1e-5)
    assert len(extra["expert_share"]) == 4 and sum(extra["expert_share"]) == pytest.approx(1.0, abs=1e-5)
    assert extra["selected_fraction"] == pytest.approx(0.5, abs=0.02)


# -- scoring -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A prepared one-stage recipe with online selection against a small HF reference folder."""
    tmp = tmp_path_factory.mktemp("rho1")
    en, py = small_corpus(tmp, "en", 12), small_corpus(tmp, "code", 12)
    sched = {"warmup": 1, "max_lr": 3e-3, "min_lr": 3e-4, "decay": "cosine"}
    selection = {"method": "rho1", "ratio": 0.6, "reference": str(tmp / "ref"), "scoring": "online"}
    stage = {"name": "target", "tokens": 8 * 64 * STEPS, "schedule": sched,
             "sources": [{"name": "en", "path": str(en)}, {"name": "py", "path": str(py)}]}
    plain = recipe_dict(tmp, [stage], checkpoint={"every": 2, "keep": 2}, deepspeed={"zero_stage": 1})
    tok = load_tokenizer(load_recipe(write_recipe(tmp, plain, "plain.yaml")).tokenizer)
    # the reference: the same tiny architecture with other weights (seed 99)
    ref = build_model(load_recipe(write_recipe(tmp, {**plain, "seed": 99}, "seed99.yaml")), tok.vocab_size, tok.eos_id)
    ref.save_pretrained(tmp / "ref")
    path = write_recipe(tmp, {**plain, "stages": [{**stage, "selection": selection}]})
    assert main(["prepare", str(path), "--quiet"]) == 0
    return {"tmp": tmp, "path": path, "vocab": tok.vocab_size}


def _with(setup, name: str, **selection) -> Path:
    raw = yaml.safe_load(setup["path"].read_text())
    raw["stages"][0]["selection"].update(selection)
    return write_recipe(setup["tmp"], raw, name)


class _Engine:
    """What the training step (pipeline/train/step.py) needs of a DeepSpeed engine, around a plain module."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **kw):
        return self.model(**kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def _step_grads(recipe, rho1: Rho1) -> tuple[float, dict, list[torch.Tensor]]:
    tok = load_tokenizer(recipe.tokenizer)
    model = build_model(recipe, tok.vocab_size, tok.eos_id)
    out = Step(Objective(), rho1)(_Engine(model), StageStream(recipe, 0), torch.device("cpu"))
    loss, extra = out.loss, out.extra
    return loss, extra, [p.grad.clone() for p in model.parameters()]


def test_precomputed_and_online_give_the_same_mask_and_step(setup, tmp_path):
    recipe = load_recipe(_with(setup, "pre.yaml", scoring="precomputed"))
    store = score_stage(recipe, "target", tmp_path, block_steps=1, progress=False)
    assert store.blocks() == STEPS and not store.missing()
    reference = Rho1.for_stage(stage_context(load_recipe(setup["path"]), tmp_path), StageStream(recipe, 0)).reference
    stream = StageStream(recipe, 0)
    for _ in range(3 * stream.grad_accum):  # micro-batches of the first three steps
        batch = next(stream)
        online, stored = reference_losses(reference, batch), store.lookup(batch["index"], batch["labels"])
        assert torch.equal(online, stored)
        theta = torch.rand_like(online) * 10
        assert torch.equal(select_top(theta - online, batch["labels"] != -100, 0.6),
                           select_top(theta - stored, batch["labels"] != -100, 0.6))
    # a whole step through both paths: same loss, metrics and gradients
    online = _step_grads(recipe, Rho1.for_stage(stage_context(load_recipe(setup["path"]), tmp_path), StageStream(recipe, 0)))
    pre = _step_grads(recipe, Rho1.for_stage(stage_context(recipe, tmp_path), StageStream(recipe, 0)))
    assert online[0] == pre[0] and online[1] == pre[1]
    assert all(torch.equal(a, b) for a, b in zip(online[2], pre[2]))
    assert online[1]["selected_fraction"] == pytest.approx(0.6, abs=1e-3)
    assert set(online[1]["selected_share"]) == {"en", "py"}


def test_rho1_and_the_loader_workers_take_the_stage_plan_and_manifests_read_once(setup, tmp_path, monkeypatch):
    """The stage's plan is built once and handed down, and each source's manifest is read once per
    stage: RHO-1's setup (precomputed or online) and the DataLoader workers read none again."""
    import pipeline.data.shards as shards
    from pipeline.data.loader import StreamLoader
    from pipeline.recipe.plan import build_plan

    recipe = load_recipe(_with(setup, "pre.yaml", scoring="precomputed"))
    score_stage(recipe, "target", tmp_path, block_steps=1, progress=False)
    plan = build_plan(recipe, shards.prepared_tokens(recipe))[0]  # as the trainer builds it, once per run
    stream = StageStream(recipe, 0, plan=plan)
    want = [next(stream)["input_ids"] for _ in range(2 * stream.grad_accum)]
    reads, real = [], shards.read_source_manifest
    monkeypatch.setattr(shards, "read_source_manifest", lambda folder: reads.append(folder.name) or real(folder))
    loader = StreamLoader(StageStream(recipe, 0, plan=plan), num_workers=2)
    assert sorted(reads) == ["en", "py"] and loader.plan is plan

    def refuse(folder):
        raise AssertionError(f"{folder}: manifest read again (or the plan rebuilt) after the stage started")

    monkeypatch.setattr(shards, "read_source_manifest", refuse)  # forked workers inherit this too
    assert Rho1.for_stage(stage_context(recipe, tmp_path, plan), loader).sources == ["en", "py"]
    online = Rho1.for_stage(stage_context(load_recipe(setup["path"]), tmp_path, plan), loader)
    assert online.sources == ["en", "py"] and online.reference is not None
    got = [next(loader)["input_ids"] for _ in range(len(want))]
    loader.close()
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_scoring_resumes_only_the_missing_blocks(setup, tmp_path):
    recipe = load_recipe(_with(setup, "pre.yaml", scoring="precomputed"))
    store = score_stage(recipe, "target", tmp_path, block_steps=1, progress=False)
    before = {b: store.block(b).read_bytes() for b in range(store.blocks())}
    mtimes = {b: store.block(b).stat().st_mtime_ns for b in range(store.blocks())}
    store.block(2).unlink()
    store = score_stage(recipe, "target", tmp_path, block_steps=1, progress=False)
    assert {b: store.block(b).read_bytes() for b in range(store.blocks())} == before
    assert [store.block(b).stat().st_mtime_ns == mtimes[b] for b in range(store.blocks())] == [True, True, False, True]


def test_stale_scores_are_refused(setup, tmp_path):
    recipe = load_recipe(_with(setup, "pre.yaml", scoring="precomputed"))
    stream = StageStream(recipe, 0)
    store = ScoreStore.for_stage(recipe, 0)

    def check(r):
        s = StageStream(r, 0)
        ScoreStore.for_stage(r, 0).check(stream_fingerprint(s.plan, s.state_dict()),
                                         reference_fingerprint(reference_path(r, 0, tmp_path)), r, 0)

    shutil.rmtree(store.folder, ignore_errors=True)
    with pytest.raises(StrataError, match="no RHO-1 scores for stage 'target'.*strata score"):
        check(recipe)
    score_stage(recipe, "target", tmp_path, block_steps=2, progress=False)
    check(recipe)  # fresh scores pass
    # another reference model (same architecture, other weights)
    tok = load_tokenizer(recipe.tokenizer)
    build_model(recipe, tok.vocab_size, tok.eos_id).save_pretrained(tmp_path / "other-ref")
    with pytest.raises(StrataError, match="another reference model") as e:
        check(load_recipe(_with(setup, "other.yaml", scoring="precomputed", reference=str(tmp_path / "other-ref"))))
    assert "\n" not in str(e.value)
    # another stream: a different seed reshuffles the documents
    raw = yaml.safe_load(_with(setup, "pre.yaml", scoring="precomputed").read_text())
    with pytest.raises(StrataError, match="another stream .*seed"):
        check(load_recipe(write_recipe(setup["tmp"], {**raw, "seed": 8}, "seed8.yaml")))
    # and the data itself: every sample's labels are checked against the stored CRC
    batch = next(stream)
    fresh = StageStream(recipe, 0)
    store.check(stream_fingerprint(fresh.plan, fresh.state_dict()),
                reference_fingerprint(reference_path(recipe, 0, tmp_path)), recipe, 0)
    labels = batch["labels"].clone()
    labels[0, 3] += 1
    with pytest.raises(StrataError, match="do not match the data of sample 0"):
        store.lookup(batch["index"], labels)
    store.block(1).unlink()
    with pytest.raises(StrataError, match=r"incomplete \(1 of 2 block"):
        check(recipe)


def test_a_reference_stage_resolves_to_its_export(setup, tmp_path):
    raw = yaml.safe_load(setup["path"].read_text())
    first = {**raw["stages"][0], "name": "clean"}
    first.pop("selection")
    second = {**raw["stages"][0], "selection": {"method": "rho1", "reference": "clean"},
              "sources": [{**src, "name": src["name"] + "2"} for src in raw["stages"][0]["sources"]]}
    recipe = load_recipe(write_recipe(setup["tmp"], {**raw, "stages": [first, second]}, "two.yaml"))
    with pytest.raises(StrataError, match="stage 'clean', which has no export yet"):
        reference_path(recipe, 1, tmp_path)
    hf = tmp_path / "stages" / "01-clean" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    assert reference_path(recipe, 1, tmp_path) == hf
    assert Selection(reference="clean").scope == "global_batch"


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_mid_stage_with_precomputed_selection_distill_and_l2_matches_uninterrupted_online_run(setup, tmp_path):
    # uninterrupted, online scoring, two ranks x two micro-batches: the global-batch ranking
    # with distillation from the initial model and an L2 pull towards it: every term in one step
    raw = yaml.safe_load(setup["path"].read_text())
    raw["stages"][0]["distill"] = {"teacher": "previous", "weight": 0.5}
    raw["stages"][0]["regularize"] = {"method": "l2", "weight": 1.0}
    combo = write_recipe(setup["tmp"], raw, "combo.yaml")
    online = tmp_path / "online"
    strata(["train", combo, "--run-dir", online], nproc=2)
    # precomputed: scored by two ranks, then killed after step 3 (last checkpoint: step 2) and resumed
    raw["stages"][0]["selection"]["scoring"] = "precomputed"
    pre_recipe = write_recipe(setup["tmp"], raw, "pre-e2e.yaml")
    ScoreStore.for_stage(load_recipe(pre_recipe), 0).start({})  # no scores left from other tests
    strata(["score", str(pre_recipe), "--stage", "target", "--block-steps", "1", "--quiet"], nproc=2)
    pre = tmp_path / "pre"
    strata(["train", str(pre_recipe), "--run-dir", str(pre)], nproc=2, fault="kill@1:3", expect="killed")
    proc = strata(["train", str(pre_recipe), "--run-dir", str(pre)], nproc=2)
    assert "resuming at step 2" in proc.stdout
    got, want = step_metrics(pre), step_metrics(online)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got == want  # every loss, grad norm and selection statistic, bit for bit
    for row in got:
        assert row["selected_fraction"] == pytest.approx(0.6, abs=1e-3)
        assert set(row["selected_share"]) == {"en", "py"} and np.isfinite(row["excess_loss"])
        assert row["kl"] >= 0 and row["penalty"] >= 0 and row["ce"] > 0
    assert got[0]["kl"] == pytest.approx(0.0, abs=1e-6) and got[0]["penalty"] == 0.0 and got[-1]["kl"] > 0 and got[-1]["penalty"] > 0
    assert got[-1]["loss"] < got[0]["loss"]
