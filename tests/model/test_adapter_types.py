"""Every adapter type: it trains only its own parameters (the base weights stay bit-identical),
keeps packed documents apart, and a non-mergeable one reloads from its export (base + adapter
folder) to the very logits of the trained model. Prompt and prefix tuning run each packed
document as its own row: the loss of a packed batch is the sum over its documents run alone."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TOKENIZER
from test_partial import real_ids, tiny_llama  # noqa: F401  (real_ids is a fixture)

import pipeline.model.documents as documents_module
from pipeline.cli import main
from pipeline.model.adapters import add_adapter, base_state_dict, export_parts, load_export
from pipeline.model.build import load_pretrained
from pipeline.model.loss import causal_lm_loss, token_ce, token_losses, token_stats

TYPES = {
    "ia3": {"type": "ia3"},
    "llama_adapter": {"type": "llama_adapter", "length": 4},
    "bottleneck": {"type": "bottleneck", "size": 8, "placement": "houlsby"},
    "lora": {"type": "lora", "r": 4},
    "prompt_tuning": {"type": "prompt_tuning", "length": 4},
    "prefix_tuning": {"type": "prefix_tuning", "length": 4},
}
ADAPTER_MARKS = ("ia3_", "adaption_", "bottleneck_", "lora_", "prompt_encoder.")
PROMPT_LEARNING = ["prompt_tuning", "prefix_tuning"]


def packed(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each row holds two documents (positions restart at 20)."""
    positions = torch.cat([torch.arange(20), torch.arange(ids.shape[1] - 21)]).repeat(len(ids), 1)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": positions}


def trained(kind: str, ids: torch.Tensor, steps: int = 3) -> torch.nn.Module:
    model = add_adapter(tiny_llama(), TYPES[kind], seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        causal_lm_loss(model, packed(ids)).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_each_type_trains_only_its_own_parameters(kind: str, real_ids: torch.Tensor) -> None:  # noqa: F811
    before = tiny_llama().state_dict()
    model = trained(kind, real_ids)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(any(m in n for m in ADAPTER_MARKS) for n in trainable), trainable
    base = base_state_dict(model)
    assert sorted(base) == sorted(before)
    for name, weight in before.items():
        assert torch.equal(base[name], weight), name  # bit-identical
    fresh = add_adapter(tiny_llama(), TYPES[kind], seed=0)
    moved = [n for n, p in model.named_parameters() if p.requires_grad
             and not torch.equal(p, dict(fresh.named_parameters())[n])]
    assert moved  # the adapter did train


@pytest.mark.parametrize("kind", ["llama_adapter", "bottleneck"])
def test_packed_window_equals_its_documents_one_by_one(kind: str, real_ids: torch.Tensor) -> None:  # noqa: F811
    model = trained(kind, real_ids, steps=2)
    ids = real_ids[:1, :40]
    with torch.no_grad():
        whole = model(input_ids=ids, position_ids=torch.cat([torch.arange(15), torch.arange(25)])[None]).logits
        first = model(input_ids=ids[:, :15], position_ids=torch.arange(15)[None]).logits
        second = model(input_ids=ids[:, 15:], position_ids=torch.arange(25)[None]).logits
    torch.testing.assert_close(whole, torch.cat([first, second], 1), rtol=1e-4, atol=1e-5)


def exported(kind: str, ids: torch.Tensor, tmp_path: Path) -> tuple[torch.nn.Module, Path, Path]:
    """A model trained two steps, and its stage-end export: (model, hf folder, adapter folder)."""
    model = trained(kind, ids, steps=2)
    base_dir, adapter_dir = tmp_path / "hf", tmp_path / "adapter"
    plain, state = export_parts(model, adapter_dir, str(base_dir))
    plain.save_pretrained(str(base_dir), state_dict=state)
    return model, base_dir, adapter_dir


@pytest.mark.parametrize("kind", ["llama_adapter", "bottleneck"])
def test_unmergeable_export_reloads_to_the_evaluated_logits(kind: str, real_ids: torch.Tensor,  # noqa: F811
                                                             tmp_path: Path) -> None:
    model, base_dir, _ = exported(kind, real_ids, tmp_path)
    reloaded = load_export(base_dir, TYPES[kind])  # PeftModel.from_pretrained / load_bottleneck: what evaluation loads
    with torch.no_grad():
        want = model(input_ids=real_ids).logits
        got = reloaded.eval()(input_ids=real_ids).logits
        plain_logits = tiny_llama()(input_ids=real_ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(plain_logits, want)  # the adapter is in the logits, not only the base


def three_documents(ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[tuple[int, int, int]]]:
    """Two packed windows of 40 tokens: the first holds documents of 15 and 25 tokens, the second
    one of 40 (a fragment counts as a document); and each document as (window, start, end)."""
    window = ids[:, :41]
    positions = torch.stack([torch.cat([torch.arange(15), torch.arange(25)]), torch.arange(40)])
    batch = {"input_ids": window[:, :-1], "labels": window[:, 1:], "position_ids": positions}
    return batch, [(0, 0, 15), (0, 15, 40), (1, 0, 40)]


@pytest.mark.parametrize(("kind", "budget"), [("prompt_tuning", 2), ("prefix_tuning", 2), ("prompt_tuning", 1)])
def test_prompt_learning_loss_of_a_packed_batch_is_the_sum_over_its_documents(
        kind: str, budget: int, real_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    model = trained(kind, real_ids, steps=2)
    batch, documents = three_documents(real_ids)
    monkeypatch.setattr(documents_module, "ROW_BUDGET", budget)  # 1: the rows run in two forwards
    assert len(documents_module.row_groups([40, 25, 15], budget * batch["input_ids"].numel())) == 3 - budget
    with torch.no_grad():
        packed_losses = token_losses(model, batch)
        alone = []
        for row, i, j in documents:  # each document through the PeftModel's own forward, no position ids
            logits = model(input_ids=batch["input_ids"][row:row + 1, i:j]).logits[0, -(j - i):]
            alone.append(token_ce(logits, batch["labels"][row, i:j]))
    torch.testing.assert_close(packed_losses.sum(), torch.cat(alone).sum(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(packed_losses[0, :15], alone[0], rtol=1e-5, atol=1e-5)
    # the prompt is in every document's loss, not only the window's first: the plain model differs
    plain = token_losses(model.get_base_model(), batch)
    assert not torch.allclose(plain[0, 15:], packed_losses[0, 15:])


@pytest.mark.parametrize("kind", PROMPT_LEARNING)
def test_prompt_learning_export_reloads_with_peft_to_the_evaluated_logits(kind: str, real_ids: torch.Tensor,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    from peft import PeftModel

    model, base_dir, adapter_dir = exported(kind, real_ids, tmp_path)
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["README.md", "adapter_config.json",
                                                             "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(load_pretrained(base_dir), str(adapter_dir)).eval()
    batch, documents = three_documents(real_ids)
    with torch.no_grad():
        assert [torch.equal(a, b) for a, b in zip(token_stats(reloaded, batch), token_stats(model, batch))] == [True] * 2
        row, i, j = documents[1]
        document = batch["input_ids"][row:row + 1, i:j]
        assert torch.equal(reloaded(input_ids=document).logits, model(input_ids=document).logits)


def check_recipe(tmp_path: Path, stages: str, model: str = "{init: {hidden_size: 32, num_layers: 1, num_heads: 2, "
                 "intermediate_size: 64}}", checkpointing: bool = False, zero: int = 1) -> Path:
    corpus = tmp_path / "en.txt"
    corpus.write_text("some text\n")
    text = f"""\
name: t
tokenizer: {Path(__file__).resolve().parents[2] / 'tokenizers' / 'demo.model'}
model: {model}
seq_len: 32
batch: {{micro: 1, global: 1}}
data: {{dir: {tmp_path / 'data'}}}
train: {{activation_checkpointing: {str(checkpointing).lower()}}}
deepspeed: {{zero_stage: {zero}}}
stages:
{stages.format(corpus=corpus)}"""
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


def test_check_accepts_prompt_and_prefix_tuning_and_refuses_what_cannot_be_right(tmp_path: Path, capsys) -> None:
    stage = """\
  - name: {name}
    sources: [{{{{name: en, path: {{corpus}}}}}}]
    schedule: {{{{max_lr: 1.0e-3}}}}
    adapter: {{{{type: {kind}, length: {length}}}}}
"""
    for kind, checkpointing in (("prompt_tuning", True), ("prefix_tuning", False)):
        recipe = check_recipe(tmp_path, stage.format(name="a", kind=kind, length=8), checkpointing=checkpointing)
        assert main(["check", str(recipe)]) == 0
    folder = tmp_path / "pretrained"
    tiny_llama().save_pretrained(str(folder))
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"max_position_embeddings": 2048', '"max_position_embeddings": 40'))
    stages = (stage.format(name="a", kind="prefix_tuning", length="4, prefix_projection: true")
              + stage.format(name="b", kind="prompt_tuning", length="16, prompt_tuning_init: TEXT, "
                             "tokenizer_name_or_path: gpt2") + "    merge: {{with: previous}}\n"
              + stage.format(name="c", kind="prompt_tuning", length=4) + "    expand: {{method: llama_pro, add_layers: 1}}\n"
              + "    distill: {{teacher: previous, features: {{weight: 0.1}}}}\n")
    capsys.readouterr()
    recipe = check_recipe(tmp_path, stages, model=f"{{from_pretrained: {folder}}}", checkpointing=True, zero=3)
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    for line in ["stages[0].adapter.type: prefix_tuning cannot be merged into the weights, so the next stage",
                 "stages[0].adapter.type: prefix_tuning cannot be combined with train.activation_checkpointing",
                 "stages[0].adapter.prefix_projection: cannot be true under ZeRO-3",
                 "stages[1].adapter.type: prompt_tuning cannot be combined with merge",
                 "stages[1].adapter.tokenizer_name_or_path: prompt_tuning_init TEXT needs a local Hugging Face "
                 "tokenizer folder here (nothing is downloaded), got 'gpt2'",
                 "stages[1].adapter.length: 16 virtual tokens before a document of up to seq_len 32 tokens need 48 "
                 "positions; the model has 40 (max_position_embeddings)",
                 "stages[2].adapter: cannot be combined with expand",
                 "stages[2].adapter.type: prompt_tuning cannot be combined with distill.features"]:
        assert line in err, err


@pytest.mark.parametrize("kind", PROMPT_LEARNING)
def test_lm_eval_scores_a_prompt_learning_model_as_strata_evaluates_it(kind: str, real_ids: torch.Tensor  # noqa: F811
                                                                       ) -> None:
    """lm-eval's HFLM (the `evaluation: tasks` harness) scores single right-padded sequences through
    the PeftModel itself and drops the virtual tokens' logits: the same log-likelihood as Strata's
    per-document forward."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from pipeline.evaluate.harness import hf_tokenizer

    model = trained(kind, real_ids, steps=2)
    lm = HFLM(pretrained=model, tokenizer=hf_tokenizer(None, SimpleNamespace(tokenizer=TOKENIZER)), batch_size=2,
              max_length=64)
    ends = [30, 45]  # two requests of different lengths in one batch: the shorter is padded on the right
    got = lm._loglikelihood_tokens([(("", ""), real_ids[r, :20].tolist(), real_ids[r, 20:end].tolist())
                                    for r, end in enumerate(ends)])
    for r, end in enumerate(ends):
        seq = real_ids[r:r + 1, :end]
        batch = {"input_ids": seq[:, :-1], "labels": seq[:, 1:], "position_ids": torch.arange(end - 1)[None]}
        with torch.no_grad():
            loss, _ = token_stats(model, batch)
        assert got[r][0] == pytest.approx(-loss[0, 19:].sum().item(), rel=1e-6)


def test_trainable_patterns_name_the_plain_models_parameters_under_prompt_learning() -> None:
    """peft wraps a prompt-learning model in `base_model.` only; `trainable:` patterns still use
    the plain model's names, and the prompt keeps training."""
    from pipeline.model.trainable import apply_trainable

    model = add_adapter(tiny_llama(), TYPES["prompt_tuning"], seed=0)
    apply_trainable(model, ["model.norm.weight", "lm_head.*"])
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "base_model.lm_head.weight", "base_model.model.norm.weight", "prompt_encoder.default.embedding.weight"]
