"""The `adapter:` stage key: which types exist, which merge, and the check of a stage's adapter
block by key path (pipeline/model/adapters.py builds them).

Strata's short keys (r, alpha, dropout, targets, feedforward, length, layers, size, placement)
map to each library's names; every other key passes to the peft config of the type unchanged,
the way `deepspeed:` passes through to DeepSpeed.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from pipeline.recipe.typed_yaml import Problems

ADAPTER_TYPES = ("lora", "ia3", "llama_adapter", "bottleneck", "prompt_tuning", "prefix_tuning")
MERGEABLE = ("lora", "ia3")
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")  # virtual tokens per sequence: one row per document
DEFAULT_LENGTH = 10  # virtual tokens (prompt / prefix tuning) and adapter_len (llama_adapter) when not given
# Strata's short keys -> the peft config's names, per type.
RENAMED = {"lora": {"alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules"},
           "ia3": {"targets": "target_modules", "feedforward": "feedforward_modules"},
           "llama_adapter": {"length": "adapter_len", "layers": "adapter_layers"},
           "prompt_tuning": {"length": "num_virtual_tokens"},
           "prefix_tuning": {"length": "num_virtual_tokens"}}
BOTTLENECK_KEYS = ("size", "placement")
_PEFT_CLASS = {"lora": "LoraConfig", "ia3": "IA3Config", "llama_adapter": "AdaptionPromptConfig",
               "prompt_tuning": "PromptTuningConfig", "prefix_tuning": "PrefixTuningConfig"}


def peft_config_class(kind: str) -> Any:
    import peft  # a heavy optional library: imported only when a recipe has an adapter

    return getattr(peft, _PEFT_CLASS[kind])


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


_SHORT_CHECKS = {
    "r": (_is_count, "an integer > 0"), "size": (_is_count, "an integer > 0"),
    "length": (_is_count, "an integer > 0"), "layers": (_is_count, "an integer > 0"),
    "alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"),
    "dropout": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
    "targets": (lambda v: isinstance(v, (str, list)) and v, "a module name or a list of them"),
    "feedforward": (lambda v: isinstance(v, (str, list)) and v, "a module name or a list of them"),
    "placement": (lambda v: v in ("houlsby", "pfeiffer"), "houlsby or pfeiffer"),
}


def check_adapter(adapter: dict[str, Any], ap: str, problems: Problems) -> None:
    """The adapter block of one stage (`ap` is its key path)."""
    kind = adapter.get("type", "lora")
    if kind not in ADAPTER_TYPES:
        problems.add(f"{ap}.type", f"must be one of {', '.join(ADAPTER_TYPES)} (DoRA, rsLoRA: lora with use_dora / "
                     f"use_rslora), got {kind!r}")
        return
    short = BOTTLENECK_KEYS if kind == "bottleneck" else tuple(RENAMED[kind]) + (("r",) if kind == "lora" else ())
    for key in short:
        ok, want = _SHORT_CHECKS[key]
        if key in adapter and not ok(adapter[key]):
            problems.add(f"{ap}.{key}", f"must be {want}, got {adapter[key]!r}")
    if kind == "bottleneck":
        options: set[str] = set()
    else:
        try:
            options = {f.name for f in fields(peft_config_class(kind)) if f.init}
        except ImportError:
            problems.add(ap, "needs peft (pip install peft)")
            return
    for key in adapter:
        if key not in ("type", *short) and key not in options:
            hint = difflib.get_close_matches(str(key), sorted(options | set(short)), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.add(f"{ap}.{key}", f"unknown key for adapter type {kind}: neither {'/'.join(short)} "
                         f"nor an option of {_PEFT_CLASS.get(kind, 'the bottleneck adapter')}{extra}")


def check_prompt_learning(stage: Any, ap: str, recipe: Any, model_dir: Path | None, problems: Problems) -> None:
    """What prompt and prefix tuning cannot be combined with (`ap` is the adapter's key path;
    `model_dir` the resolved `model.from_pretrained` folder, if any)."""
    adapter, kind, seq_len = stage.adapter, stage.adapter["type"], recipe.seq_len
    if stage.merge is not None:
        problems.add(f"{ap}.type", f"{kind} cannot be combined with merge: its stage keeps the base weights and "
                     "trains only virtual tokens, so there are no trained weights to merge")
    if adapter.get("prefix_projection") is True and recipe.zero_stage == 3:
        problems.add(f"{ap}.prefix_projection", "cannot be true under ZeRO-3: the export computes the projected "
                     "prefix with a forward on rank 0 alone, which the other ranks never join")
    if stage.distill is not None and stage.distill.features is not None:
        problems.add(f"{ap}.type", f"{kind} cannot be combined with distill.features: the student's blocks run one "
                     "row per document behind the virtual tokens, so their hidden states do not line up with the "
                     "teacher's packed windows")
    if kind == "prefix_tuning" and recipe.train.activation_checkpointing:
        problems.add(f"{ap}.type", "prefix_tuning cannot be combined with train.activation_checkpointing: "
                     "transformers' checkpointed blocks drop the KV cache that holds the learned prefix")
    tokenizer = adapter.get("tokenizer_name_or_path")
    if adapter.get("prompt_tuning_init") == "TEXT" and not (isinstance(tokenizer, str) and Path(tokenizer).is_dir()):
        problems.add(f"{ap}.tokenizer_name_or_path", "prompt_tuning_init TEXT needs a local Hugging Face tokenizer "
                     f"folder here (nothing is downloaded), got {tokenizer!r}")
    key = next((k for k in ("length", "num_virtual_tokens") if k in adapter), "length")
    length = adapter.get(key, DEFAULT_LENGTH)
    limit = _max_positions(model_dir) if model_dir is not None else None
    if _is_count(length) and limit is not None and seq_len + length > limit:
        problems.add(f"{ap}.{key}", f"{length} virtual tokens before a document of up to seq_len "
                     f"{seq_len} tokens need {seq_len + length} positions; the model has "
                     f"{limit} (max_position_embeddings): shorten one of them")


def _max_positions(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the model folder's own check reports it
    limit = config.get("max_position_embeddings", config.get("n_positions"))
    return limit if isinstance(limit, int) else None
