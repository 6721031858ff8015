"""Partial training: trainable patterns, peft LoRA adapters, MoE upcycling and added experts.

The model-level behaviours here run in-process on tiny models; the trained stages (a LoRA stage
and an MoE stage, each killed and resumed) are in tests/train/test_partial_resume.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOKENIZER, demo_docs
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from pipeline.cli import main
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import RecipeError, StrataError
from pipeline.model.adapters import add_adapter, merged_state_dict
from pipeline.model.experts import add_experts, balance_loss, freeze_old_experts, router_metrics, upcycle
from pipeline.model.trainable import EMBEDDINGS_AND_HEAD, apply_trainable, optimizer_groups, trainable_count
from pipeline.recipe.load import parse_recipe


def tiny_llama(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=8000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, use_cache=False,
                         initializer_range=0.05)
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def real_ids() -> torch.Tensor:
    tok = load_tokenizer(TOKENIZER)
    return torch.tensor([t[:64] for t in tok.encode_batch([d["text"][:400] for d in demo_docs("en", 2)])])


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    """A few AdamW steps with weight decay on what the model says trains."""
    opt = torch.optim.AdamW(optimizer_groups(model, 0.1), lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + (balance_loss(model, out) or 0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# ---------------------------------------------------------------------------------------------
# Trainable patterns.


def test_trainable_patterns_freeze_exactly_what_they_say(real_ids):
    model = tiny_llama()
    apply_trainable(model, ["model.layers.*.mlp.*", "lm_head.*"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, real_ids)
    for name, p in model.named_parameters():
        trains = ".mlp." in name or name.startswith("lm_head.")
        assert p.requires_grad == trains, name
        assert torch.equal(p, before[name]) != trains, name  # frozen: bit-identical; trained: moved


def test_embeddings_and_head_only_is_one_line_and_counts_tied_weights_once():
    model = tiny_llama(tied=True)
    apply_trainable(model, EMBEDDINGS_AND_HEAD)  # lm_head.* names the tied matrix: no error
    trainable, total = trainable_count(model)
    assert trainable == 8000 * 64 and total == sum(p.numel() for p in model.parameters())


def test_a_pattern_that_matches_nothing_is_an_error_naming_it():
    with pytest.raises(StrataError, match=r"'model\.layer\.\*\.mlp\.\*'"):
        apply_trainable(tiny_llama(), ["lm_head.*", "model.layer.*.mlp.*"])


def test_check_prints_trainable_parameters_and_names_a_bad_pattern(tmp_path, capsys):
    from conftest import general_then_code, recipe_dict, write_recipe

    stages = general_then_code(tmp_path, (2, 2))
    stages[1]["trainable"] = ["model.embed_tokens.*", "lm_head.*"]
    assert main(["check", str(write_recipe(tmp_path, recipe_dict(tmp_path, stages)))]) == 0
    out = capsys.readouterr().out
    # embeddings + head: 2 x 8000 x 64; blocks: 2 x (4 x 64^2 + 3 x 64 x 128 + 2 x 64); final norm 64
    assert "1,024,000 of 1,106,240 parameters train (92.57%)" in out
    assert "1,106,240 of 1,106,240 parameters train (100.00%)" in out  # stage 0 trains everything
    stages[1]["trainable"] = ["lm_head.*", "model.embed.*"]
    assert main(["check", str(write_recipe(tmp_path, recipe_dict(tmp_path, stages)))]) == 2
    assert "stages[1].trainable[1]: 'model.embed.*' matches no parameter" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# LoRA with peft.


def test_lora_export_differs_only_in_target_modules_by_a_low_rank_matrix(real_ids):
    base = tiny_llama()
    start = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_adapter(base, {"type": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}, seed=1)
    trainable, total = trainable_count(model)
    assert 0 < trainable < 0.05 * total
    train_steps(model, real_ids)
    merged = merged_state_dict(model)
    assert set(merged) == set(start)
    for key, w in start.items():
        delta = merged[key] - w
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta).item() <= 4, key
        else:
            assert torch.equal(merged[key], w), key  # untouched outside the targets, bit for bit
    # merging is undone exactly: the peft model still computes with the unmerged weights
    assert torch.equal(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
                       start["model.layers.0.self_attn.q_proj.weight"])


def test_adapter_options_pass_through_to_peft_and_unknown_keys_are_errors(tmp_path):
    from conftest import general_then_code, recipe_dict

    stages = general_then_code(tmp_path, (2, 2))
    stages[1]["adapter"] = {"type": "lora", "r": 4, "use_dora": True, "use_rslora": True}
    parse_recipe(recipe_dict(tmp_path, stages))
    model = add_adapter(tiny_llama(), stages[1]["adapter"], seed=0)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())  # DoRA, built by peft
    stages[1]["adapter"] = {"type": "lora", "r": 0, "use_dorra": True}
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe_dict(tmp_path, stages))
    text = str(e.value)
    assert "stages[1].adapter.r: must be an integer > 0" in text
    assert "stages[1].adapter.use_dorra: unknown key" in text and "did you mean 'use_dora'" in text
    stages[1]["adapter"] = {"type": "ia4"}
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe_dict(tmp_path, stages))
    assert "stages[1].adapter.type: must be one of lora, ia3, llama_adapter, bottleneck" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Mixture of experts.


def test_upcycling_is_exact_and_the_export_loads_and_generates(tmp_path, real_ids):
    dense = tiny_llama()
    moe = upcycle(dense, experts=4, top_k=2, aux_loss_coef=0.02, seed=3).eval()
    assert isinstance(moe, MixtralForCausalLM)
    assert (logits(moe, real_ids) - logits(dense, real_ids)).abs().max() <= 1e-5
    router = moe.model.layers[0].mlp.gate.weight
    assert router.std() > 0.01  # random router: tokens spread, the copies can diverge
    moe.save_pretrained(tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", local_files_only=True, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "MixtralForCausalLM" and loaded.config.router_aux_loss_coef == 0.02
    assert torch.equal(logits(loaded, real_ids), logits(moe, real_ids))
    out = loaded.generate(real_ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
    assert out.shape == (1, 14)


def test_balance_loss_is_in_the_loss_and_expert_shares_are_logged(real_ids):
    moe = upcycle(tiny_llama(), experts=4, top_k=2, aux_loss_coef=0.5, seed=0)
    out = moe(input_ids=real_ids)
    term = balance_loss(moe, out)
    assert torch.allclose(term, 0.5 * out.aux_loss) and term.requires_grad
    metrics = router_metrics(moe)
    assert metrics["balance_loss"] == pytest.approx(float(out.aux_loss.detach()))
    assert len(metrics["expert_share"]) == 4 and sum(metrics["expert_share"]) == pytest.approx(1.0, abs=1e-5)
    assert router_metrics(moe) == {}  # reset after each step
    assert balance_loss(tiny_llama(), tiny_llama()(input_ids=real_ids)) is None  # dense: no term


def test_added_experts_train_while_old_experts_and_the_rest_stay_bit_identical(real_ids):
    moe = upcycle(tiny_llama(), experts=2, top_k=1, seed=0).eval()
    before_logits = logits(moe, real_ids)
    new = add_experts(moe, 2)
    assert new == [2, 3] and moe.config.num_local_experts == 4
    # top-1: a copied expert ties with its source and computes the same function -> exact
    assert (logits(moe, real_ids) - before_logits).abs().max() <= 1e-5
    freeze_old_experts(moe, new)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    with torch.no_grad():  # route some tokens to the new experts so they get a gradient
        for layer in moe.model.layers:
            layer.mlp.gate.weight[2:] += 0.5
    train_steps(moe, real_ids)
    for name, p in moe.named_parameters():
        if ".mlp.experts." in name:
            assert torch.equal(p[:2], before[name][:2]), name
            assert not torch.equal(p[2:], before[name][2:]), name
        elif not name.endswith("mlp.gate.weight"):
            assert torch.equal(p, before[name]), name


def test_expand_command_upcycles_a_hf_folder(tmp_path, real_ids):
    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "base")
    assert main(["expand", str(tmp_path / "base"), "--experts", "4", "--top-k", "2", "--out", str(tmp_path / "moe")]) == 0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", local_files_only=True, dtype=torch.float32).eval()
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert (logits(moe, real_ids) - logits(dense, real_ids)).abs().max() <= 1e-5
