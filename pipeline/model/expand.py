"""Growing a model between stages: LLaMA-Pro depth, function-preserving width, larger vocabulary.

Every growth here is *function preserving at insertion*: the grown model computes the same
logits as before (in fp32 up to the rounding of reordered sums, <= 1e-6), so a stage starts from
what the model knew and only adds capacity.

- Depth (LLaMA Pro, Wu et al. 2024): split the L blocks into K groups and insert after each group a
  copy of its last block whose `o_proj` and `down_proj` are zero. A pre-norm block with zero output
  projections adds nothing to the residual stream, so it is an exact identity. The norms are
  copied, never zeroed: a zero norm weight would kill the gradient of everything before it.
- Width (bert2BERT / ELLE style): new MLP units and new attention heads are *copies* of existing
  ones, and the outgoing weights of each copied unit are split between its copies, so their sum
  is unchanged. New residual dimensions start at zero (nothing writes them at insertion, so RMSNorm
  sees the old vector padded with zeros); the norm weights and `rms_norm_eps` are rescaled so the
  normalised old coordinates are unchanged exactly. See `width_expand` for what is exact.
- Vocabulary: `extend_sentencepiece` appends pieces learned on a new language to a sentencepiece
  model without touching any existing id; `resize_embeddings` adds rows at the mean embedding.

The trainer calls one function, `build_stage_model`: the architecture of stage k is the base model
with the expansions of stages <= k applied, and a stage that expands starts from the previous
stage's exported weights. Everything else is pure tensor surgery on a Hugging Face Llama.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.errors import RecipeError, StrataError
from pipeline.model.trainable import apply_trainable, describe, trainable_count, unmatched

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

    from pipeline.recipe.spec import Recipe


# ---------------------------------------------------------------------------------------------
# Depth: LLaMA Pro.


def llama_pro_positions(num_layers: int, add_layers: int) -> list[int]:
    """Indices (in the expanded model) of the inserted blocks: one after each of K near-equal groups."""
    if not 0 < add_layers <= num_layers:
        raise StrataError(f"expand.add_layers must be between 1 and the model's {num_layers} layers, got {add_layers}")
    base, extra = divmod(num_layers, add_layers)
    positions, end = [], 0
    for group in range(add_layers):
        end += base + (1 if group < extra else 0)  # the first `extra` groups get one more block
        positions.append(end + group)  # `group` blocks were inserted before this one
    return positions


@torch.no_grad()
def llama_pro_expand(model: LlamaForCausalLM, add_layers: int) -> list[int]:
    """Insert `add_layers` identity blocks in place; returns the indices of the new blocks."""
    layers = model.model.layers
    positions = llama_pro_positions(len(layers), add_layers)
    grown: list[nn.Module] = []
    for layer in layers:
        grown.append(layer)
        if len(grown) in positions:  # the next index is a new block: a copy of this group's last
            block = copy.deepcopy(layer)
            for proj in (block.self_attn.o_proj, block.mlp.down_proj):
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
            grown.append(block)
    model.model.layers = nn.ModuleList(grown)
    for i, layer in enumerate(grown):
        layer.self_attn.layer_idx = i  # the KV cache is indexed by it
    model.config.num_hidden_layers = len(grown)
    if getattr(model.config, "layer_types", None):
        kinds = list(model.config.layer_types)
        for p in positions:
            kinds.insert(p, kinds[p - 1])
        model.config.layer_types = kinds
    return positions


def freeze_except_layers(model: nn.Module, trainable_layers: Iterable[int]) -> tuple[int, int]:
    """Freeze every parameter but those of the given blocks; returns (trainable, total) counts."""
    keep = {f"model.layers.{i}." for i in trainable_layers}
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(k) for k in keep))
    return trainable_count(model)


# ---------------------------------------------------------------------------------------------
# Width: bert2BERT-style copies with split outgoing weights.


def _copy_map(old: int, new: int) -> torch.Tensor:
    """Unit j of the wider layer copies old unit map[j]: the old units first, then round robin."""
    return torch.arange(new) % old


def _split_factors(mapping: torch.Tensor, old: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Per new unit, its share of the old unit's outgoing weight; shares of one old unit sum to 1.

    With noise > 0 the shares are perturbed (still summing to 1), so the copies receive different
    gradients and can diverge; the function at insertion stays the same.
    """
    counts = torch.bincount(mapping, minlength=old).double()
    share = 1.0 / counts[mapping]
    if noise > 0:
        jitter = torch.randn(mapping.shape[0], generator=gen, dtype=torch.float64) * noise
        mean = torch.zeros(old, dtype=torch.float64).index_add_(0, mapping, jitter) / counts
        share = share + jitter - mean[mapping]  # zero-sum perturbation within each group of copies
    return share


@torch.no_grad()
def width_expand(model: LlamaForCausalLM, hidden_size: int, intermediate_size: int | None = None,
                 noise: float = 0.0, seed: int = 0) -> LlamaForCausalLM:
    """A wider copy of `model` that computes the same function (returns a new model).

    Exact (up to summation order): new MLP units copy old ones and split their `down_proj`
    columns; new attention heads copy old heads (with their key/value group under GQA) and split
    their `o_proj` columns; head_dim is kept, so RoPE is unchanged. New residual dimensions are
    zero: the embeddings' new columns and every writer into the residual stream (`o_proj`,
    `down_proj` rows) are zero there, so the old coordinates evolve exactly as before and the new
    ones stay 0. RMSNorm over the wider stream divides by sqrt(mean over H2 dims), which is
    sqrt(H/H2) times the old one: the old norm weights are multiplied by sqrt(H/H2) and
    `rms_norm_eps` by H/H2, which makes the normalised old coordinates identical. Readers of the
    new dimensions (q/k/v/gate/up columns, an untied lm_head) get small random weights; they
    multiply zeros at insertion and give the new dimensions a gradient. With tied embeddings the
    lm_head's new columns are the embeddings' (zero): still exact, and trainable through the input
    side. Not exact: nothing else, but the rescaled eps is a config change an exported model keeps.
    """
    from transformers import LlamaForCausalLM

    cfg = model.config
    new_cfg = _wider_config(cfg, hidden_size, intermediate_size or cfg.intermediate_size)
    with torch.random.fork_rng(devices=[]):  # the init below is overwritten; keep the caller's RNG
        wide = LlamaForCausalLM._from_config(new_cfg, attn_implementation=cfg._attn_implementation,
                                             dtype=model.dtype)
    missing, unexpected = wide.load_state_dict(_wide_state(model, new_cfg, noise, seed), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    wide.config.use_cache = cfg.use_cache
    return wide


def _wider_config(cfg, hidden_size: int, intermediate_size: int):
    """The wider model's config: head_dim kept (so RoPE is unchanged), query and key/value heads
    grown in proportion, `rms_norm_eps` rescaled by H/H2. Refuses what cannot widen exactly."""
    h, inter, h2, i2 = cfg.hidden_size, cfg.intermediate_size, hidden_size, intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    if h2 < h or i2 < inter:
        raise StrataError(f"width expansion cannot shrink the model ({h}x{inter} -> {h2}x{i2})")
    if h2 % head_dim or (h2 // head_dim) % group:
        raise StrataError(f"expand.hidden_size {h2} must be a multiple of head_dim x (heads per key/value head) "
                          f"= {head_dim} x {group} (head_dim is kept so RoPE is unchanged)")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise StrataError("width expansion of a Llama with attention or MLP biases is not supported")
    new_cfg = copy.deepcopy(cfg)
    new_cfg.hidden_size, new_cfg.intermediate_size = h2, i2
    new_cfg.num_attention_heads, new_cfg.num_key_value_heads = h2 // head_dim, h2 // head_dim // group
    new_cfg.head_dim = head_dim
    new_cfg.rms_norm_eps = cfg.rms_norm_eps * h / h2
    return new_cfg


@dataclass(frozen=True)
class _Widening:
    """The residual stream grown from `h` to `h2` dimensions: how its readers, writers and norms
    grow. Readers' new columns are drawn from `gen` in the order they are asked for."""

    h: int
    h2: int
    gen: torch.Generator
    std: float  # of the readers' new columns (the model's initializer_range)

    def reader(self, old: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """A reader of the residual stream: old rows (or copied rows), random columns for new dims."""
        src = old if rows is None else old[rows]
        out = torch.randn(src.shape[0], self.h2, generator=self.gen, dtype=torch.float32).to(src.dtype) * self.std
        out[:, :self.h] = src
        return out

    def writer(self, old: torch.Tensor, cols: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """A writer into the residual stream: split columns, zero rows for the new dimensions."""
        out = torch.zeros(self.h2, cols.shape[0], dtype=old.dtype)
        out[:self.h] = (old[:, cols].double() * share).to(old.dtype)
        return out

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        """An RMSNorm weight rescaled by sqrt(H/H2); new dims get the mean (they multiply zeros at insertion)."""
        scaled = w * math.sqrt(self.h / self.h2)
        out = torch.empty(self.h2, dtype=w.dtype)
        out[:self.h] = scaled
        out[self.h:] = scaled.mean()  # a typical value for training
        return out


def _head_rows(cfg, new_cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New query head j copies old head qmap[j], new key/value head k copies kvmap[k], so the
    groups stay aligned: (qmap, the copied rows of q_proj, those of k_proj and v_proj)."""
    head_dim, group = new_cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    kvmap = _copy_map(cfg.num_key_value_heads, new_cfg.num_key_value_heads)
    qmap = (kvmap.repeat_interleave(group) * group + torch.arange(new_cfg.num_attention_heads) % group)
    q_rows = (qmap[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    kv_rows = (kvmap[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return qmap, q_rows, kv_rows


def _wide_state(model: LlamaForCausalLM, new_cfg, noise: float, seed: int) -> dict[str, torch.Tensor]:
    """The wider model's weights, from `model`'s (width_expand says how; the random draws follow
    one seeded generator in a fixed order, so the same seed gives the same model)."""
    cfg = model.config
    w = _Widening(cfg.hidden_size, new_cfg.hidden_size, torch.Generator().manual_seed(seed),
                  getattr(cfg, "initializer_range", 0.02))
    qmap, q_rows, kv_rows = _head_rows(cfg, new_cfg)
    o_share = _split_factors(qmap, cfg.num_attention_heads, noise, w.gen).repeat_interleave(new_cfg.head_dim)
    inter = cfg.intermediate_size
    umap = _copy_map(inter, new_cfg.intermediate_size)
    state = {}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        att, mlp = layer.self_attn, layer.mlp
        state[p + "self_attn.q_proj.weight"] = w.reader(att.q_proj.weight, q_rows)
        state[p + "self_attn.k_proj.weight"] = w.reader(att.k_proj.weight, kv_rows)
        state[p + "self_attn.v_proj.weight"] = w.reader(att.v_proj.weight, kv_rows)
        state[p + "self_attn.o_proj.weight"] = w.writer(att.o_proj.weight, q_rows, o_share)
        state[p + "mlp.gate_proj.weight"] = w.reader(mlp.gate_proj.weight, umap)
        state[p + "mlp.up_proj.weight"] = w.reader(mlp.up_proj.weight, umap)
        state[p + "mlp.down_proj.weight"] = w.writer(mlp.down_proj.weight, umap, _split_factors(umap, inter, noise, w.gen))
        state[p + "input_layernorm.weight"] = w.norm(layer.input_layernorm.weight)
        state[p + "post_attention_layernorm.weight"] = w.norm(layer.post_attention_layernorm.weight)
    emb = model.get_input_embeddings().weight
    wide_emb = torch.zeros(emb.shape[0], w.h2, dtype=emb.dtype)
    wide_emb[:, :w.h] = emb
    state["model.embed_tokens.weight"] = wide_emb
    state["model.norm.weight"] = w.norm(model.model.norm.weight)
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = w.reader(model.lm_head.weight)
    return state


# ---------------------------------------------------------------------------------------------
# Vocabulary.


@torch.no_grad()
def resize_embeddings(model: nn.Module, vocab_size: int) -> None:
    """Grow the embeddings (and an untied lm_head) to `vocab_size` rows; new rows = the old mean.

    Old ids keep their vectors bit for bit. The mean (not Hugging Face's sampled `mean_resizing`)
    is deterministic and consumes no random numbers, so resume stays exact.
    """
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if vocab_size <= old:
        return
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb.weight

    def grown(weight: torch.Tensor) -> nn.Parameter:
        mean = weight.double().mean(0).to(weight.dtype)
        return nn.Parameter(torch.cat([weight, mean.expand(vocab_size - old, -1)], 0).contiguous())

    emb.weight = grown(emb.weight)
    emb.num_embeddings = vocab_size
    head = model.get_output_embeddings()
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            head.weight = grown(head.weight)
        head.out_features = vocab_size
    model.config.vocab_size = vocab_size


# ---------------------------------------------------------------------------------------------
# The trainer's entry point.


def apply_expansion(model: LlamaForCausalLM, expand, seed: int,
                    freeze: bool = False) -> tuple[LlamaForCausalLM, list[int] | None]:
    """Apply one stage's `expand` section; returns the model and, for llama_pro, the new blocks.
    `freeze`: the stage trains now, so added experts freeze the old ones (`freeze_old`)."""
    if expand.method == "llama_pro":
        return model, llama_pro_expand(model, expand.add_layers)
    if expand.method == "moe":  # pipeline/model/experts.py: upcycling, or experts added (frozen in place)
        from pipeline.model.experts import apply_moe, freeze_old_experts

        model, new_experts = apply_moe(model, expand, seed)
        if new_experts and expand.freeze_old and freeze:
            freeze_old_experts(model, new_experts)
        return model, None
    return width_expand(model, expand.hidden_size, expand.intermediate_size, expand.noise, seed), None


def build_stage_model(recipe: Recipe, index: int, vocab_size: int, eos_id: int | None,
                      start_from: Path | None = None) -> tuple[LlamaForCausalLM, str | None]:
    """The model stage `index` trains: the base architecture grown by every expansion up to it.

    `vocab_size` is the recipe's tokenizer's; a stage tokenizer in force at `index` grows the
    embeddings (and an untied lm_head) to its vocabulary with `resize_embeddings`, before the
    stage's own expansion. `start_from` (the previous stage's Hugging Face export) is given when
    the stage expands or changes the vocabulary and starts fresh: those weights are loaded into
    the pre-expansion architecture, then grown. When
    it is None the weights are placeholders the caller overwrites from a checkpoint of this
    architecture. Freezing follows the stage's `expand.freeze_old`, fresh or resumed, so the
    optimizer always holds the same parameters. Returns the model and a line for the log.
    """
    from pipeline.data.tokenizer import cached_tokenizer
    from pipeline.model.build import build_model, load_pretrained

    stages = recipe.stages
    if start_from is not None:
        model = load_pretrained(start_from)
        earlier = []  # the export already has the expansions of earlier stages
    else:
        model = build_model(recipe, vocab_size, eos_id)
        earlier = [s.expand for s in stages[:index] if s.expand is not None]
    for k, exp in enumerate(earlier):
        model, _ = apply_expansion(model, exp, recipe.seed + k)
    # A stage tokenizer (in force from its stage on) grows the embeddings: exact mean rows, old ids kept.
    rows, notes = model.get_input_embeddings().weight.shape[0], []
    tokenizer = recipe.tokenizer_at(index)
    if tokenizer != recipe.tokenizer and cached_tokenizer(tokenizer).vocab_size > rows:
        resize_embeddings(model, cached_tokenizer(tokenizer).vocab_size)
        if stages[index].tokenizer is not None:
            notes.append(f"embeddings resized for the stage tokenizer: {rows} -> {model.config.vocab_size} rows "
                         "(old ids keep their vectors, new rows at the mean)")
    exp = stages[index].expand
    if exp is not None:
        model, note = _expand_stage(model, exp, recipe.seed + sum(s.expand is not None for s in stages[:index]))
        notes.append(note)
    return _partial_training(model, recipe, index, notes)


def _expand_stage(model: LlamaForCausalLM, exp, seed: int) -> tuple[LlamaForCausalLM, str]:
    before = sum(p.numel() for p in model.parameters())
    layers_before = model.config.num_hidden_layers
    model, new_blocks = apply_expansion(model, exp, seed, freeze=True)
    if new_blocks is not None and exp.freeze_old:
        freeze_except_layers(model, new_blocks)
    trainable, total = trainable_count(model)
    cfg = model.config
    experts = f", {cfg.num_local_experts} experts (top-{cfg.num_experts_per_tok})" if exp.method == "moe" else ""
    return model, (f"expanded ({exp.method}): {layers_before} -> {cfg.num_hidden_layers} layers, hidden "
                   f"{cfg.hidden_size}, mlp {cfg.intermediate_size}{experts}; {before:,} -> {total:,} parameters, "
                   f"{trainable:,} trainable")


def _partial_training(model: LlamaForCausalLM, recipe: Recipe, index: int, notes: list[str]):
    """The stage's adapter (pipeline/model/adapters.py) and `trainable:` patterns; the log line."""
    stage = recipe.stages[index]
    if stage.adapter is not None:
        from pipeline.model.adapters import add_adapter

        model = add_adapter(model, stage.adapter, recipe.seed + index, recipe.file, f"stages[{index}].adapter")
    if stage.trainable:
        missing = unmatched(model, stage.trainable)
        if missing:
            raise RecipeError(recipe.file, [f"stages[{index}].trainable[{stage.trainable.index(p)}]: {p!r} matches no "
                                            "parameter of the model (names look like model.layers.0.mlp.up_proj.weight)"
                                            for p in missing])
        apply_trainable(model, stage.trainable, f"{recipe.file}: stages[{index}].trainable")
    notes.append(describe(model))
    return model, "; ".join(notes) or None


def starts_from_export(recipe: Recipe, index: int) -> bool:
    """A fresh stage `index` loads the previous stage's export rather than its end checkpoint: it
    changes the architecture (expand, adapter), or the previous stage's checkpoint holds an adapter."""
    stage, prev = recipe.stages[index], recipe.stages[index - 1] if index > 0 else None
    return prev is not None and (stage.expand is not None or stage.adapter is not None or prev.adapter is not None)
