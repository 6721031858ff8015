"""Growing the model: LLaMA-Pro depth and width expansion preserve the function; vocabulary extension.

The trainer test at the bottom runs a 3-stage recipe (train; grow 2 -> 4 layers with the old ones
frozen; grow the width) as one process, kills it inside the expanded stage and checks that the
resumed run reproduces every logged number of the uninterrupted one.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TOKENIZER, demo_docs, prepared_recipe, recipe_dict, small_corpus, step_metrics, strata
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.cli import main
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import RecipeError
from pipeline.model.expand import llama_pro_expand, llama_pro_positions, resize_embeddings, width_expand
from pipeline.recipe.load import parse_recipe


def tiny_llama(layers: int = 4, kv_heads: int = 4, tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=8000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                         use_cache=False, initializer_range=0.05)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # trained-looking norms, so that their handling is actually tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def real_ids() -> torch.Tensor:
    tok = load_tokenizer(TOKENIZER)
    texts = [d["text"][:400] for d in demo_docs("en", 2)]
    ids = [t[:64] for t in tok.encode_batch(texts)]
    return torch.tensor(ids)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_llama_pro_positions_split_blocks_into_groups():
    assert llama_pro_positions(4, 2) == [2, 5]  # [0 1] new [2 3] new
    assert llama_pro_positions(5, 2) == [3, 6]  # groups of 3 and 2
    assert llama_pro_positions(2, 2) == [1, 3]


def test_llama_pro_expansion_is_an_exact_identity_on_real_text(real_ids):
    model = tiny_llama(layers=4)
    before = logits(model, real_ids)
    old = [layer for layer in model.model.layers]
    new = llama_pro_expand(model, 2)
    assert new == [2, 5] and model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6))
    assert [model.model.layers[i] for i in (0, 1, 3, 4)] == old  # the original blocks, in order
    for i, copied in zip(new, (old[1], old[3])):
        block = model.model.layers[i]
        assert not block.self_attn.o_proj.weight.any() and not block.mlp.down_proj.weight.any()
        assert torch.equal(block.input_layernorm.weight, copied.input_layernorm.weight)  # norms copied, not zeroed
        assert torch.equal(block.self_attn.q_proj.weight, copied.self_attn.q_proj.weight)
    assert (logits(model, real_ids) - before).abs().max() <= 1e-6


@pytest.mark.parametrize("kv_heads,tied,hidden,inter", [(4, False, 96, 200), (2, True, 128, 256)])
def test_width_expansion_preserves_the_function(real_ids, kv_heads, tied, hidden, inter):
    model = tiny_llama(layers=2, kv_heads=kv_heads, tied=tied)
    before = logits(model, real_ids)
    wide = width_expand(model, hidden, inter, noise=0.05, seed=3).eval()
    cfg = wide.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (hidden, inter, 16)
    assert cfg.num_attention_heads == hidden // 16 and cfg.num_attention_heads // cfg.num_key_value_heads == 4 // kv_heads
    # RMSNorm over the wider stream divides by a different (rescaled) root mean square: exact in
    # real arithmetic, a few fp32 ulps here, so the bound is relative to the logits' scale (~2).
    assert (logits(wide, real_ids) - before).abs().max() <= 1e-6 * max(1.0, before.abs().max())
    # The new residual dimensions start at zero and are written by nothing yet.
    assert not wide.model.embed_tokens.weight[:, 64:].any()
    assert not wide.model.layers[0].self_attn.o_proj.weight[64:].any()
    assert wide.model.layers[0].mlp.gate_proj.weight[:, 64:].any()  # readers of new dims get a gradient
    assert (wide.lm_head.weight is wide.model.embed_tokens.weight) == tied


def test_resize_embeddings_keeps_old_rows_and_starts_new_rows_at_the_mean():
    for tied in (False, True):
        model = tiny_llama(layers=1, tied=tied)
        emb, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
        resize_embeddings(model, 8100)
        assert model.config.vocab_size == 8100 and model.model.embed_tokens.weight.shape == (8100, 64)
        assert torch.equal(model.model.embed_tokens.weight[:8000], emb)
        assert torch.equal(model.lm_head.weight[:8000], head)
        assert torch.allclose(model.model.embed_tokens.weight[8000:], emb.mean(0).expand(100, -1))
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        assert model(input_ids=torch.tensor([[8099, 5]])).logits.shape == (1, 2, 8100)


def test_tokenizer_extend_keeps_old_ids_and_encodes_german_in_fewer_tokens(tmp_path, capsys):
    import sentencepiece as spm

    docs = demo_docs("de")
    train, heldout = small_corpus(tmp_path, "de", 200, chars=100_000), [d["text"] for d in docs[300:360]]
    out = tmp_path / "de.model"
    assert main(["tokenizer", "extend", str(TOKENIZER), "--input", str(train), "--add", "1500", "--out", str(out)]) == 0
    assert "8000 -> 9500" in capsys.readouterr().out
    base, ext = spm.SentencePieceProcessor(model_file=str(TOKENIZER)), spm.SentencePieceProcessor(model_file=str(out))
    assert ext.get_piece_size() == 9500
    for i in range(base.get_piece_size()):  # every old id: same piece, same type
        assert (ext.id_to_piece(i), ext.is_control(i), ext.is_byte(i)) == (base.id_to_piece(i), base.is_control(i),
                                                                           base.is_byte(i))
    assert ext.eos_id() == base.eos_id()
    new_tokens = sum(len(x) for x in ext.encode(heldout))
    old_tokens = sum(len(x) for x in base.encode(heldout))
    assert new_tokens < 0.99 * old_tokens, (new_tokens, old_tokens)  # held-out German documents
    assert any(i >= 8000 for x in ext.encode(heldout) for i in x)
    for text in heldout[:5] + ["def f(x):\n    return x  # plain English", "Grüße, Äpfel & Öl"]:
        assert ext.decode(ext.encode(text)) == text


def test_expand_command_writes_a_loadable_llama_with_more_layers(tmp_path, real_ids):
    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    assert main(["expand", str(tmp_path / "base"), "--add-layers", "1", "--out", str(tmp_path / "pro")]) == 0
    pro = AutoModelForCausalLM.from_pretrained(tmp_path / "pro", local_files_only=True, dtype=torch.float32).eval()
    assert isinstance(pro, LlamaForCausalLM) and pro.config.num_hidden_layers == 3
    assert (tmp_path / "pro" / "tokenizer.model").is_file()
    assert (logits(pro, real_ids) - logits(model, real_ids)).abs().max() <= 1e-6
    assert main(["expand", str(tmp_path / "base"), "--hidden-size", "96", "--out", str(tmp_path / "wide")]) == 0
    wide = AutoModelForCausalLM.from_pretrained(tmp_path / "wide", local_files_only=True, dtype=torch.float32).eval()
    want = logits(model, real_ids)
    assert wide.config.hidden_size == 96 and (logits(wide, real_ids) - want).abs().max() <= 1e-6 * want.abs().max()
    assert main(["expand", str(tmp_path / "base"), "--add-layers", "5", "--out", str(tmp_path / "x")]) == 1


def test_an_expanding_stage_must_reset_the_optimizer(tmp_path):
    src = tmp_path / "x.txt"
    src.write_text("hello\n")
    stages = [{"name": "a", "sources": [{"name": "x", "path": str(src)}], "schedule": {"max_lr": 1e-3},
               "expand": {"method": "llama_pro", "add_layers": 1}, "reset_optimizer": False}]
    with pytest.raises(RecipeError, match=r"stages\[0\]\.reset_optimizer"):
        parse_recipe(recipe_dict(tmp_path, stages), "t.yaml", tmp_path)


# ---------------------------------------------------------------------------------------------
# In the trainer: grow at the stage boundary, train only the new blocks, resume exactly.

STEPS = (3, 4, 2)


@pytest.fixture(scope="module")
def grow_recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grow")
    en, py = small_corpus(tmp, "en", 12), small_corpus(tmp, "code", 12)
    sched = {"warmup": 1, "max_lr": 3e-3, "min_lr": 3e-4}
    tokens = [8 * 64 * s for s in STEPS]
    raw = recipe_dict(tmp, [
        {"name": "general", "tokens": tokens[0], "sources": [{"name": "en", "path": str(en)}], "schedule": sched},
        {"name": "code", "tokens": tokens[1], "sources": [{"name": "py", "path": str(py)}], "schedule": sched,
         "expand": {"method": "llama_pro", "add_layers": 2, "freeze_old": True}},
        {"name": "wide", "tokens": tokens[2], "sources": [{"name": "py2", "path": str(py)}], "schedule": sched,
         "expand": {"method": "width", "hidden_size": 96, "intermediate_size": 160, "noise": 0.01}},
    ], checkpoint={"every": 2, "keep": 2}, deepspeed={"zero_stage": 1})
    path = prepared_recipe(tmp, raw)
    return path


@pytest.fixture(scope="module")
def grown(grow_recipe, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grown") / "run"
    proc = strata(["train", grow_recipe, "--run-dir", run_dir])
    return run_dir, proc.stdout


@pytest.mark.slow
def test_expanded_stage_trains_only_new_blocks_and_exports_a_deeper_llama(grown):
    from safetensors.torch import load_file

    run_dir, stdout = grown
    assert "expanded (llama_pro): 2 -> 4 layers" in stdout and "expanded (width)" in stdout
    assert [(r["stage"], r["step"]) for r in step_metrics(run_dir)][-1] == (2, STEPS[2])
    before = load_file(run_dir / "stages" / "01-general" / "hf" / "model.safetensors")
    after = load_file(run_dir / "stages" / "02-code" / "hf" / "model.safetensors")
    old_to_new = {0: 0, 1: 2}  # 2 blocks, 2 groups of 1: new blocks at 1 and 3
    for name, value in before.items():  # every original parameter is bit-identical after training
        for old, new in old_to_new.items():
            name_after = name.replace(f"layers.{old}.", f"layers.{new}.")
            if name_after != name or "layers." not in name:
                break
        assert torch.equal(after[name_after], value), name
    for i in (1, 3):  # the inserted blocks learned: their zeroed projections are not zero any more
        assert after[f"model.layers.{i}.self_attn.o_proj.weight"].any()
        assert after[f"model.layers.{i}.mlp.down_proj.weight"].any()
    # The optimizer held exactly the new blocks' parameters: DeepSpeed records them apart from frozen ones.
    states = torch.load(run_dir / "checkpoints" / "s02-end" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    trained = {n for group in states["param_shapes"] for n in group}
    assert trained == {n for n in after if n.startswith(("model.layers.1.", "model.layers.3."))}
    model = AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "02-code" / "hf", local_files_only=True)
    assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == 4
    wide = AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "03-wide" / "hf", local_files_only=True)
    assert (wide.config.num_hidden_layers, wide.config.hidden_size, wide.config.intermediate_size) == (4, 96, 160)
    states = torch.load(run_dir / "checkpoints" / "s03-end" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    trained = {n for group in states["param_shapes"] for n in group}
    assert trained == set(wide.state_dict())  # freezing belongs to the stage that grew by depth


@pytest.mark.slow
def test_resume_inside_an_expanded_stage_matches_uninterrupted_run(grow_recipe, grown, tmp_path):

    reference, _ = grown
    run_dir = tmp_path / "run"
    strata(["train", grow_recipe, "--run-dir", run_dir], fault="kill@2:3", expect="killed")  # last checkpoint: stage 2, step 2
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"] == "s02-step000002"
    proc = strata(["train", grow_recipe, "--run-dir", run_dir])
    assert "resuming at step 2 from s02-step000002" in proc.stdout
    assert step_metrics(run_dir) == step_metrics(reference)
