"""Every adapter type: it trains only its own parameters (the base weights stay bit-identical),
keeps packed documents apart, and a non-mergeable one reloads from its export (base + adapter
folder) to the very logits of the trained model; prompt and prefix tuning are refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_partial import real_ids, tiny_llama  # noqa: F401  (real_ids is a fixture)

from pipeline.errors import RecipeError
from pipeline.model.adapters import add_adapter, base_state_dict, export_parts, load_export
from pipeline.model.loss import causal_lm_loss
from pipeline.recipe.load import load_recipe

TYPES = {
    "ia3": {"type": "ia3"},
    "llama_adapter": {"type": "llama_adapter", "length": 4},
    "bottleneck": {"type": "bottleneck", "size": 8, "placement": "houlsby"},
    "lora": {"type": "lora", "r": 4},
}
ADAPTER_MARKS = ("ia3_", "adaption_", "bottleneck_", "lora_")


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


@pytest.mark.parametrize("kind", ["llama_adapter", "bottleneck"])
def test_unmergeable_export_reloads_to_the_evaluated_logits(kind: str, real_ids: torch.Tensor,  # noqa: F811
                                                             tmp_path: Path) -> None:
    model = trained(kind, real_ids, steps=2)
    base_dir, adapter_dir = tmp_path / "hf", tmp_path / "adapter"
    plain, state = export_parts(model, adapter_dir, str(base_dir))
    plain.save_pretrained(str(base_dir), state_dict=state)
    reloaded = load_export(base_dir, TYPES[kind])  # PeftModel.from_pretrained / load_bottleneck: what evaluation loads
    with torch.no_grad():
        want = model(input_ids=real_ids).logits
        got = reloaded.eval()(input_ids=real_ids).logits
        plain_logits = tiny_llama()(input_ids=real_ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(plain_logits, want)  # the adapter is in the logits, not only the base


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_prompt_and_prefix_tuning_are_refused_with_the_reason(kind: str, tmp_path: Path) -> None:
    corpus = tmp_path / "en.txt"
    corpus.write_text("some text\n")
    text = f"""\
name: t
tokenizer: {Path(__file__).resolve().parents[2] / 'tokenizers' / 'demo.model'}
model: {{init: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}}}
seq_len: 32
batch: {{micro: 1, global: 1}}
stages:
  - name: a
    sources: [{{name: en, path: {corpus}}}]
    schedule: {{max_lr: 1.0e-3}}
    adapter: {{type: {kind}, num_virtual_tokens: 8}}
"""
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert f"stages[0].adapter.type: {kind} is not supported: peft's prompt learning drops position_ids" in str(e.value)
