"""Stage exports: `use_cache: true` (generate() reuses its cache) and the dtype the recipe asks for
(`export: {dtype: auto | fp32 | bf16}`, auto = the training dtype), still loadable offline."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TOKENIZER, recipe_dict, small_corpus
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import RecipeError
from pipeline.model.build import build_model
from pipeline.model.export import export_dtype, export_hf
from pipeline.recipe.load import parse_recipe


def recipe(tmp_path, **overrides):
    stage = {"name": "a", "tokens": 4096, "schedule": {"max_lr": 1e-3},
             "sources": [{"name": "en", "path": str(small_corpus(tmp_path, "en", 2))}]}
    return parse_recipe(recipe_dict(tmp_path, [stage], **overrides), "r.yaml", tmp_path)


def test_export_dtype_auto_is_the_training_dtype_and_the_key_is_validated(tmp_path):
    assert recipe(tmp_path).export.dtype == "auto"
    assert export_dtype("auto", torch.bfloat16) == torch.bfloat16 and export_dtype("auto", torch.float32) == torch.float32
    assert export_dtype("fp32", torch.bfloat16) == torch.float32 and export_dtype("bf16", torch.float32) == torch.bfloat16
    assert recipe(tmp_path, export={"dtype": "bf16"}).export.dtype == "bf16"
    with pytest.raises(RecipeError, match=r"export\.dtype: must be one of 'auto', 'fp32', 'bf16', got 'fp16'"):
        recipe(tmp_path, export={"dtype": "fp16"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_export_has_use_cache_and_its_dtype_and_loads_offline(tmp_path, dtype):
    tok = load_tokenizer(TOKENIZER)
    model = build_model(recipe(tmp_path), tok.vocab_size, tok.eos_id)
    engine = SimpleNamespace(module=model, zero_optimization_partition_weights=lambda: False)  # DeepSpeed's surface
    out = tmp_path / "hf"
    export_hf(engine, tok, out, rank=0, dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == str(dtype).removeprefix("torch.")
    assert model.config.use_cache is False  # the training model is left as it was
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert hf.config.use_cache is True
    ids = torch.tensor(tok.encode_batch(["The river"]))
    with torch.no_grad():
        cached = hf.generate(ids, max_new_tokens=4, do_sample=False)
        plain = hf.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    want = {k: v.to(dtype) for k, v in model.state_dict().items()}
    got = hf.to(dtype).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
