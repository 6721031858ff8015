"""Adapters with peft: a stage that trains LoRA (DoRA, rsLoRA, ...) on a frozen model.

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

ADAPTER_TYPES = ("lora",)
_RENAMED = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules"}
DEFAULT_TARGETS = ["q_proj", "v_proj"]


def lora_config(adapter: dict[str, Any]) -> Any:
    from peft import LoraConfig, TaskType

    options = {_RENAMED.get(k, k): v for k, v in adapter.items() if k != "type"}
    options.setdefault("target_modules", DEFAULT_TARGETS)
    try:
        return LoraConfig(task_type=TaskType.CAUSAL_LM, **options)
    except (TypeError, ValueError) as e:
        raise StrataError(f"adapter: peft rejects this LoRA config ({e})") from None


def target_problems(model: nn.Module, adapter: dict[str, Any], where: str) -> list[str]:
    """`where.targets[i]: 'name' matches no module of the model` for every target peft would skip.

    peft matches a list entry against module names by suffix (`q_proj` is every `....q_proj`) and
    fails only when *no* entry matches, so a misspelt second name would silently train nothing
    there. A string is a regular expression over the full names (`all-linear` is peft's own).
    """
    key = "targets" if "targets" in adapter else "target_modules"
    targets = adapter.get(key, DEFAULT_TARGETS)
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
    """Wrap `model` in a peft model with a fresh adapter (seeded; the caller's RNG is untouched).

    A target that names no module of the model is a RecipeError naming `file` and `where`."""
    from peft import get_peft_model

    problems = target_problems(model, adapter, where)
    if problems:
        raise RecipeError(file, problems)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, lora_config(adapter))
        except ValueError as e:  # e.g. targets that name no module of the model
            raise StrataError(f"adapter: {e}") from None


def is_adapted(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


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
        state = {n.replace(".base_layer.", "."): t.detach().cpu().clone()
                 for n, t in base.state_dict().items() if "lora_" not in n}
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
    model.save_pretrained(str(tmp))
    replace_dir(tmp, out)
