"""Mixture of experts: sparse upcycling of a dense Llama, growing experts, the router's balance loss.

Upcycling (Komatsuzaki et al. 2023): every dense MLP becomes E identical copies of itself plus a
router, and the model becomes a standard Hugging Face Mixtral (a Llama whose MLPs are sparse MoE
blocks), so every export loads with `AutoModelForCausalLM` and generates without Strata. Mixtral's
router picks the top K experts and renormalises their weights to sum to one; since the K chosen
experts are the same function f, the block computes sum_k w_k f(x) = f(x): exact at insertion
for any router (up to the rounding of the weighted sum, <= 1e-5 in fp32). The router starts
random (seeded) so that tokens spread over the experts and the copies diverge.

Growing experts (Lifelong-MoE, Chen et al. 2023): `add_experts` appends N experts, each a copy of
an existing one (round robin), and N router rows copied from their source expert's rows. What is
exact and what is not: a token whose top-K holds no copied expert is unchanged, and with K = 1
every token is unchanged (a copy ties with its source and computes the same function); with K > 1
a source and its copy can both enter a token's top-K and push out another expert, so the output
changes for those tokens. `freeze_old` freezes every parameter but the router and the new
experts: the old experts' slices of the fused expert tensors get a zero gradient (a hook) and no
weight decay, so AdamW leaves them bit-identical.

The balance loss is Mixtral's `load_balancing_loss_func` (Switch Transformer), computed by the
model when `config.output_router_logits` is on; `balance_loss` adds `router_aux_loss_coef` times
it to the language-model loss and records the per-expert token share for the metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import StrataError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, MixtralForCausalLM

_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
               "rope_parameters", "initializer_range", "tie_word_embeddings", "bos_token_id", "eos_token_id",
               "pad_token_id", "attention_dropout", "use_cache")


def is_moe(model: nn.Module) -> bool:
    return getattr(model.config, "num_local_experts", None) is not None


@torch.no_grad()
def upcycle(model: LlamaForCausalLM, experts: int, top_k: int, aux_loss_coef: float = 0.01,
            seed: int = 0) -> MixtralForCausalLM:
    """A Mixtral with every dense MLP of `model` copied into `experts` experts (a new model)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = model.config
    if cfg.model_type != "llama":
        raise StrataError(f"MoE upcycling needs a dense Llama, this model is {cfg.model_type!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise StrataError("MoE upcycling of a Llama with attention or MLP biases is not supported (Mixtral has none)")
    if not 1 <= top_k <= experts:
        raise StrataError(f"expand.top_k must be between 1 and expand.experts ({experts}), got {top_k}")
    moe_cfg = MixtralConfig(**{k: getattr(cfg, k) for k in _LLAMA_KEYS if hasattr(cfg, k)},
                            num_local_experts=experts, num_experts_per_tok=top_k,
                            router_aux_loss_coef=aux_loss_coef, output_router_logits=True, sliding_window=None)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten below; keep the caller's RNG
        moe = MixtralForCausalLM._from_config(moe_cfg, attn_implementation=cfg._attn_implementation,
                                              dtype=model.dtype)
    gen = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(model.model.layers):
        mlp, p = layer.mlp, f"model.layers.{i}.mlp."
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)  # Mixtral fuses [gate; up]
        state[p + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1)
        state[p + "experts.down_proj"] = mlp.down_proj.weight.unsqueeze(0).repeat(experts, 1, 1)
        router = torch.randn(experts, cfg.hidden_size, generator=gen) * cfg.initializer_range
        state[p + "gate.weight"] = router.to(model.dtype)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise StrataError(f"MoE upcycling: unexpected weights {unexpected} / missing {missing}")
    moe.config.use_cache = cfg.use_cache
    return moe


@torch.no_grad()
def add_experts(model: MixtralForCausalLM, count: int) -> list[int]:
    """Append `count` experts to every MoE block, copies of experts 0, 1, ... (in place)."""
    cfg = model.config
    if not is_moe(model):
        raise StrataError("expand.add_experts needs an MoE model: upcycle first (expand: {method: moe, experts: E})")
    old = cfg.num_local_experts
    source = torch.arange(count) % old
    for layer in model.model.layers:
        block = layer.mlp
        for holder, name in ((block.experts, "gate_up_proj"), (block.experts, "down_proj"), (block.gate, "weight")):
            w = getattr(holder, name)
            setattr(holder, name, nn.Parameter(torch.cat([w, w[source]], 0).contiguous()))
        block.experts.num_experts = block.gate.num_experts = old + count
    cfg.num_local_experts = old + count
    model.num_experts = old + count  # MixtralForCausalLM keeps its own copy for the balance loss
    return list(range(old, old + count))


def freeze_old_experts(model: MixtralForCausalLM, new: list[int]) -> None:
    """Train only the router and the experts in `new`; the old experts' gradient is zeroed."""
    keep = torch.zeros(model.config.num_local_experts, dtype=torch.bool)
    keep[new] = True
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("mlp.gate.weight") or ".mlp.experts." in name)
        if ".mlp.experts." in name:
            mask = keep.to(p.dtype).view(-1, 1, 1)
            p.register_hook(lambda g, m=mask: g * m.to(g.device))
            p.strata_no_decay = True  # weight decay would shrink the frozen slices


def apply_moe(model: nn.Module, expand: Any, seed: int) -> tuple[nn.Module, list[int]]:
    """A stage's `expand: {method: moe, ...}`: upcycle a dense model (returns no new experts: all
    train), or add experts to an MoE one (returns their indices; the caller freezes the old ones)."""
    if expand.add_experts is not None:
        new = add_experts(model, expand.add_experts)
        if expand.aux_loss_coef is not None:
            model.config.router_aux_loss_coef = expand.aux_loss_coef
        return model, new
    coef = 0.01 if expand.aux_loss_coef is None else expand.aux_loss_coef
    return upcycle(model, expand.experts, expand.top_k, coef, seed), []


# ---------------------------------------------------------------------------------------------
# The balance loss and its metrics.


def balance_loss(model: nn.Module, out: Any) -> torch.Tensor | None:
    """`router_aux_loss_coef` x the load-balancing loss of an MoE forward, or None for a dense one.

    Also records the loss and each expert's share of the routed tokens (over all layers) on the
    model, for `router_metrics` to log after the step.
    """
    aux = getattr(out, "aux_loss", None)
    module = getattr(model, "module", model)  # a DeepSpeed engine, or the model itself
    if aux is None or not is_moe(module) or not torch.is_tensor(aux):
        return None
    cfg = module.config
    with torch.no_grad():
        chosen = torch.cat([torch.topk(g, cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
                            for g in out.router_logits])
        counts = torch.bincount(chosen, minlength=cfg.num_local_experts).double()
        stats = module.__dict__.setdefault("_strata_router", [])
        stats.append((float(aux.detach()), counts))
    return cfg.router_aux_loss_coef * aux


def router_metrics(model: nn.Module) -> dict:
    """The balance loss (mean over the step's micro-batches) and per-expert token shares; resets."""
    module = getattr(model, "module", model)
    stats = module.__dict__.pop("_strata_router", None)
    if not stats:
        return {}
    counts = sum(c for _, c in stats)
    return {"balance_loss": sum(a for a, _ in stats) / len(stats),
            "expert_share": [round(float(x), 6) for x in counts / counts.sum()]}
