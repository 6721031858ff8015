"""The model: a Hugging Face Llama built from the recipe (seeded), or a local pretrained folder.

Packed sequences. A training window packs several documents back to back; attention must not
cross from one document into the previous one. We do not build a mask ourselves: since
transformers 5, `create_causal_mask` detects packing from `position_ids` (a position that does
not follow its predecessor by one starts a new document) whenever `attention_mask` is None and
no KV cache is used, and then masks block-diagonally for the sdpa, eager and flex backends;
flash_attention_2 derives `cu_seqlens` from the same position_ids. So the one rule is: call the
model with `position_ids`, `attention_mask=None`, `use_cache=False`. `tests/test_model.py` checks
that a packed window gives the same logits as its documents run one by one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pipeline.errors import StrataError
from pipeline.recipe.spec import Recipe

ATTENTION = "sdpa"  # flash_attention_2 is better on GPUs when installed; both honour packing


def build_model(recipe: Recipe, vocab_size: int, eos_id: int | None = None) -> PreTrainedModel:
    """A new model from `model.init`, or the local `model.from_pretrained` folder, in fp32.

    The init is seeded with `recipe.seed` inside a forked RNG, so building a model neither depends
    on nor disturbs the caller's random state: every rank builds identical weights.
    """
    if recipe.model.from_pretrained is not None:
        return load_pretrained(recipe.model.from_pretrained, vocab_size, recipe.model.trust_remote_code)
    init = recipe.model.init
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=init.hidden_size,
        intermediate_size=init.intermediate_size,
        num_hidden_layers=init.num_layers,
        num_attention_heads=init.num_heads,
        num_key_value_heads=init.num_kv_heads or init.num_heads,
        max_position_embeddings=max(recipe.seq_len, 2048),
        rope_theta=init.rope_theta,
        initializer_range=init.init_std,
        tie_word_embeddings=init.tie_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation=ATTENTION, dtype=torch.float32)
    return model


def load_pretrained(path: str | Path, vocab_size: int | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    """A local Hugging Face folder, never a download. Grows the embeddings for a larger tokenizer.

    Inside `torch.device("meta")` (`strata check` counting parameters) no weights are read: the
    architecture is built from the folder's config alone, as transformers refuses `from_pretrained`
    on the meta device.
    """
    skeleton = torch.get_default_device().type == "meta"
    try:  # code in the folder runs only if the recipe says so
        if skeleton:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=ATTENTION,
                                                     trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype=torch.float32, attn_implementation=ATTENTION,
                trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise StrataError(f"{path}: cannot load a Hugging Face model ({e})") from None
    model.config.use_cache = False
    current = model.get_input_embeddings().weight.shape[0]
    if vocab_size is not None and vocab_size > current:
        # An extended tokenizer (new-language pieces): new rows start at the mean embedding.
        model.resize_token_embeddings(vocab_size, mean_resizing=not skeleton)
    elif vocab_size is not None and vocab_size < current:
        pass  # a tokenizer smaller than the table is fine: the extra rows are never indexed
    return model
