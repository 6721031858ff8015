"""A team's own checkpoint, in miniature: a saved Hugging Face folder and a recipe that starts from it.

`save_checkpoint` writes what a team brings to Strata: a Llama-family model with grouped-query
attention (fewer key/value heads than query heads) and tied embeddings, and beside it its own
tokenizer -- a byte-level BPE trained here on the demo's real text with Hugging Face `tokenizers`,
saved as a PreTrainedTokenizerFast. `from_pretrained_recipe` writes a recipe as YAML text, the
way a user writes one, with `tokenizer:` and `model.from_pretrained:` pointing at that folder.
"""

from __future__ import annotations

from pathlib import Path

from conftest import demo_docs

VOCAB = 1024  # bytes (256) and merges learned on the demo text: requests of the demo tasks fit in 64 tokens
EOS = "<|endoftext|>"


def save_tokenizer(folder: Path) -> None:
    """A byte-level BPE trained on English prose and Python code, as a PreTrainedTokenizerFast folder."""
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [r["text"][:2000] for name in ("en", "code") for r in demo_docs(name, 100)]
    bpe.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, model_max_length=1 << 30)
    fast.save_pretrained(str(folder))


def save_checkpoint(folder: Path) -> Path:
    """The model (GQA: 4 query heads, 2 key/value heads; tied embeddings) and its tokenizer in `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    save_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=None,
                         pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    return folder


def from_pretrained_recipe(tmp: Path, checkpoint: Path, stages: str, extra: str = "",
                           name: str = "recipe.yaml") -> Path:
    """Write a recipe that starts from `checkpoint` (YAML text); `stages` is the YAML of its stage list,
    indented as list items under `stages:`, `extra` more top-level keys. Returns its path."""
    text = (f"name: own-checkpoint\n"
            f"seed: 7\n"
            f"tokenizer: {checkpoint}\n"
            f"model: {{from_pretrained: {checkpoint}}}\n"
            f"seq_len: 64\n"
            f"batch: {{micro: 2, global: 4}}\n"
            f"data: {{dir: {tmp / 'data'}, heldout: 0.1}}\n"
            f"{extra}"
            f"stages:\n{stages}")
    path = tmp / name
    path.write_text(text)
    return path
