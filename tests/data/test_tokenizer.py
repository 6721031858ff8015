"""One tokenizer interface over sentencepiece models and Hugging Face folders."""

from __future__ import annotations

import json

import pytest
from conftest import TOKENIZER, demo_docs, recipe_dict, small_corpus, write_recipe

from pipeline.cli import main
from pipeline.data.shards import load_shard, shard_paths, source_manifest
from pipeline.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from pipeline.errors import StrataError
from pipeline.recipe.load import load_recipe

SAMPLES = ["def f(x):\n    return x  # Grüße, 日本語\n\n\ttabs", "Ein Satz auf Deutsch: Äpfel & Öl.", "plain english"]


def test_demo_tokenizer_is_sentencepiece_with_eos_and_byte_fallback():
    tok = load_tokenizer(TOKENIZER)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 8000
    assert tok.eos_id == 2
    assert tok.content_hash == load_tokenizer(TOKENIZER).content_hash
    for text in SAMPLES:  # byte fallback: any text survives a round trip, whitespace included
        assert tok.decode(tok.encode_batch([text])[0]) == text


def test_exported_hf_folder_encodes_exactly_like_the_sentencepiece_model(tmp_path):
    sp = load_tokenizer(TOKENIZER)
    sp.save_to(tmp_path / "hf")
    hf = load_tokenizer(tmp_path / "hf")
    assert isinstance(hf, HFTokenizer)
    assert (hf.vocab_size, hf.eos_id) == (sp.vocab_size, sp.eos_id)
    texts = SAMPLES + [d["text"][:2000] for d in demo_docs("code", 3) + demo_docs("de", 3)]
    assert hf.encode_batch(texts) == sp.encode_batch(texts)
    assert hf.content_hash != sp.content_hash  # shards record which tokenizer made them


def test_prepare_with_a_hf_tokenizer_folder_gives_the_same_tokens(tmp_path):
    load_tokenizer(TOKENIZER).save_to(tmp_path / "hf")
    corpus = small_corpus(tmp_path, "en", 10)
    tokens = {}
    for kind, tok in (("sp", str(TOKENIZER)), ("hf", str(tmp_path / "hf"))):
        stages = [{"name": "s", "tokens": 1000, "schedule": {"max_lr": 1e-3},
                   "sources": [{"name": "en", "path": str(corpus)}]}]
        raw = recipe_dict(tmp_path, stages, tokenizer=tok, data={"dir": str(tmp_path / kind), "heldout": 0.0})
        path = write_recipe(tmp_path, raw, f"{kind}.yaml")
        assert main(["prepare", str(path), "--quiet"]) == 0
        recipe = load_recipe(path)
        manifest = source_manifest(recipe, "en")
        assert manifest["dtype"] == "uint16"
        tokens[kind] = [load_shard(p, m["sha256"])[0].tolist() for p, m in shard_paths(recipe, "en")]
    assert tokens["sp"] == tokens["hf"]


def test_tokenizer_train_command_writes_a_model_with_the_asked_vocab(tmp_path, capsys):
    corpus = small_corpus(tmp_path, "de", 20)
    out = tmp_path / "tok" / "small.model"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 400
    assert tok.eos_id == 2
    assert not (tmp_path / "tok" / "small.vocab").exists()
    assert "vocab 400" in capsys.readouterr().out
    for text in SAMPLES:  # unseen characters fall back to bytes
        assert tok.decode(tok.encode_batch([text])[0]) == text


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(StrataError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.model")


def test_hf_folder_without_eos_is_refused(tmp_path):
    load_tokenizer(TOKENIZER).save_to(tmp_path / "hf")
    config_path = tmp_path / "hf" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = None
    config_path.write_text(json.dumps(config))
    special = tmp_path / "hf" / "special_tokens_map.json"
    if special.exists():
        special.unlink()
    with pytest.raises(StrataError, match="no eos_token"):
        load_tokenizer(tmp_path / "hf")
