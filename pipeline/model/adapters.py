"""Adapters: a stage that trains LoRA (DoRA, rsLoRA, ...), IA3, a LLaMA-Adapter, bottleneck
adapters, prompt tuning or prefix tuning on a frozen model.

`adapter: {type: ...}` picks the method: `lora` and `ia3` (peft's LoraConfig / IA3Config) are
merged into the weights at the stage end; `llama_adapter` (peft's AdaptionPromptConfig: learned
prompts in the top blocks' attention, zero-gated), `bottleneck` (pipeline/model/bottleneck.py),
`prompt_tuning` and `prefix_tuning` (peft's PromptTuningConfig / PrefixTuningConfig: learned
virtual tokens, or learned keys and values in every block, before each document) cannot be: their
stage exports the base model (hf/) and the adapter (adapter/), which `PeftModel.from_pretrained`
(or `load_bottleneck`) applies to it. Every type keeps packed documents apart (each token sees its
own document and the adapter, never the document before); prompt and prefix tuning do it by
running each document of a window as its own row (pipeline/model/documents.py).

`adapter: {type: lora, r, alpha, dropout, targets, ...}` becomes a `peft.LoraConfig`: r, alpha,
dropout and targets map to r, lora_alpha, lora_dropout and target_modules; every other key goes
to LoraConfig unchanged (`use_dora: true`, `use_rslora: true`, `init_lora_weights: pissa`, ...),
the way `deepspeed:` passes through to DeepSpeed. peft freezes the base model; only the adapter
trains (plus the stage's `trainable:` patterns, pipeline/model/trainable.py).

The stage's engine holds the peft model, so mid-stage checkpoints hold the adapter (and the frozen
base, which makes a resume exact without a second file). At the stage end `save_merged` writes the
plain model with the adapter merged into its weights (no peft needed to load it) and
`save_adapter` the unmerged adapter, which `PeftModel.from_pretrained` applies to the previous
stage's export. The next stage starts from the merged export.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import RecipeError, StrataError
from pipeline.files import replace_dir, temp_dir_for
from pipeline.model.bottleneck import add_bottleneck, is_bottleneck, load_bottleneck, save_bottleneck
from pipeline.recipe.adapter_keys import DEFAULT_LENGTH, MERGEABLE, RENAMED, peft_config_class

_DEFAULTS = {"lora": {"target_modules": ["q_proj", "v_proj"]},
             "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
             "llama_adapter": {"adapter_len": DEFAULT_LENGTH},
             "prompt_tuning": {"num_virtual_tokens": DEFAULT_LENGTH}, "prefix_tuning": {"num_virtual_tokens": DEFAULT_LENGTH}}
_ADAPTER_MARKS = ("lora_", "ia3_", "adaption_", "bottleneck_", "prompt_encoder.")  # in the names of adapter parameters


def adapter_type(adapter: dict[str, Any]) -> str:
    return adapter.get("type", "lora")


def peft_config(adapter: dict[str, Any], num_layers: int | None = None) -> Any:
    """The peft config of a `lora`, `ia3`, `llama_adapter`, `prompt_tuning` or `prefix_tuning` stage key."""
    from peft import TaskType

    kind = adapter_type(adapter)
    options = {RENAMED[kind].get(k, k): v for k, v in adapter.items() if k != "type"}
    for key, value in _DEFAULTS[kind].items():
        options.setdefault(key, value)
    if kind == "llama_adapter" and num_layers is not None:
        options.setdefault("adapter_layers", num_layers)  # every block by default
    try:
        return peft_config_class(kind)(task_type=TaskType.CAUSAL_LM, **options)
    except (TypeError, ValueError) as e:
        raise StrataError(f"adapter: peft rejects this {kind} config ({e})") from None


def lora_config(adapter: dict[str, Any]) -> Any:
    return peft_config({**adapter, "type": "lora"})


def target_problems(model: nn.Module, adapter: dict[str, Any], where: str) -> list[str]:
    """`where.targets[i]: 'name' matches no module of the model` for every target peft would skip.

    peft matches a list entry against module names by suffix (`q_proj` is every `....q_proj`) and
    fails only when *no* entry matches, so a misspelt second name would silently train nothing
    there. A string is a regular expression over the full names (`all-linear` is peft's own).
    """
    kind = adapter_type(adapter)
    if kind not in MERGEABLE:  # llama_adapter, bottleneck, prompt and prefix tuning: no target list
        return []
    key = "targets" if "targets" in adapter else "target_modules"
    targets = adapter.get(key, _DEFAULTS[kind]["target_modules"])
    names = [n for n, _ in model.named_modules()]
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    hint = f"matches no module of the model (its linear layers: {', '.join(leaves)})"
    if isinstance(targets, str):
        found = targets == "all-linear" or any(re.fullmatch(targets, n) for n in names)
        return [] if found else [f"{where}.{key}: {targets!r} {hint}"]
    return [f"{where}.{key}[{i}]: {t!r} {hint}" for i, t in enumerate(targets)
            if isinstance(t, str) and not any(n == t or n.endswith(f".{t}") for n in names)]


def add_adapter(model: nn.Module, adapter: dict[str, Any], seed: int, file: str = "<recipe>",
                where: str = "adapter") -> nn.Module:
    """Wrap `model` in a peft model with a fresh adapter, or insert bottleneck adapters (seeded;
    the caller's RNG is untouched). A target that names no module of the model is a RecipeError
    naming `file` and `where`."""
    from peft import get_peft_model

    problems = target_problems(model, adapter, where)
    if problems:
        raise RecipeError(file, problems)
    kind = adapter_type(adapter)
    if kind == "bottleneck":
        return add_bottleneck(model, adapter, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, peft_config(adapter, model.config.num_hidden_layers))
        except ValueError as e:  # e.g. targets that name no module of the model
            raise StrataError(f"adapter: {e}") from None


def is_adapted(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def is_mergeable(model: nn.Module) -> bool:
    return is_adapted(model) and model.peft_config["default"].peft_type.value.lower() in MERGEABLE


def plain_name(name: str) -> str:
    """A parameter's name in the plain model, without the wrappers peft or a bottleneck puts around it."""
    return name.replace(".base_layer.", ".").replace(".self_attn.model.", ".self_attn.")


@torch.no_grad()
def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights under the adapter (not merged), under plain names."""
    base = model.get_base_model() if is_adapted(model) else model
    return {plain_name(n): t.detach().cpu().clone() for n, t in base.state_dict().items()
            if not any(mark in n for mark in _ADAPTER_MARKS)}


def export_parts(model: nn.Module, folder: Path, base_path: str | None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Save the adapter into `folder`; (the plain module, its state) for the stage's hf/ export:
    merged weights for lora / ia3, the base weights for the types that cannot be merged."""
    if is_bottleneck(model):
        save_bottleneck(model, folder)
        return model, base_state_dict(model)
    save_adapter(model, folder, base_path)
    return model.get_base_model(), merged_state_dict(model) if is_mergeable(model) else base_state_dict(model)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights with the adapter merged in, under plain names; `model` is unchanged.

    peft merges in place (W += BA); the original weights are put back bit for bit afterwards, so a
    stage-end export does not perturb the weights the stage's checkpoint and evaluation see.
    """
    base = model.get_base_model()
    originals = {n: p.detach().clone() for n, p in base.named_parameters() if ".base_layer." in n}
    model.merge_adapter()
    try:
        state = {plain_name(n): t.detach().cpu().clone()
                 for n, t in base.state_dict().items() if not any(mark in n for mark in _ADAPTER_MARKS)}
    finally:
        model.unmerge_adapter()
        params = dict(base.named_parameters())
        for n, t in originals.items():
            params[n].copy_(t)
    return state


def save_merged(model: nn.Module, out: Path) -> None:
    """A plain Hugging Face folder of the merged model (config + safetensors), no peft inside."""
    model.get_base_model().save_pretrained(str(out), state_dict=merged_state_dict(model))


def save_adapter(model: nn.Module, out: Path, base_path: str | None) -> None:
    """The unmerged adapter (adapter_config.json + weights) for `PeftModel.from_pretrained`."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_path
    tmp = temp_dir_for(out)
    # peft computes a prompt-learning adapter's weights to save with a forward of its prompt encoder;
    # under ZeRO-3 that forward on rank 0 alone (which writes the export) waits for ranks that never
    # join. Without a projection the forward is the embedding table itself, which peft reads in
    # inference mode (the mode it writes into adapter_config.json anyway).
    reads_table = config.is_prompt_learning and not getattr(config, "prefix_projection", False)
    training, config.inference_mode = config.inference_mode, config.inference_mode or reads_table
    try:
        model.save_pretrained(str(tmp))
    finally:
        config.inference_mode = training
    replace_dir(tmp, out)


def load_export(hf: Path, adapter: dict[str, Any] | None) -> nn.Module:
    """A stage's exported model as it was trained and evaluated: hf/ alone, or, for an adapter that
    cannot be merged (llama_adapter, bottleneck, prompt and prefix tuning), hf/ with the adapter/
    folder beside it applied."""
    from pipeline.model.build import load_pretrained

    kind = adapter_type(adapter) if adapter is not None else None
    folder = Path(hf).with_name("adapter")
    if kind is None or kind in MERGEABLE:
        return load_pretrained(hf)
    if not (folder / "adapter_config.json").is_file():
        raise StrataError(f"{folder}: the {kind} adapter of this stage is missing (its hf/ holds only the base model)")
    if kind == "bottleneck":
        return load_bottleneck(hf, folder)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_pretrained(hf), str(folder)).eval()
