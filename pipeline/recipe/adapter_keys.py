"""The `adapter:` stage key: which types exist, which merge, which are refused and why, and the
check of a stage's adapter block by key path (pipeline/model/adapters.py builds them).

Strata's short keys (r, alpha, dropout, targets, feedforward, length, layers, size, placement)
map to each library's names; every other key passes to the peft config of the type unchanged,
the way `deepspeed:` passes through to DeepSpeed.
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any

from pipeline.recipe.typed_yaml import Problems

ADAPTER_TYPES = ("lora", "ia3", "llama_adapter", "bottleneck")
MERGEABLE = ("lora", "ia3")
REFUSED = {  # type -> why Strata does not train it
    t: "peft's prompt learning drops position_ids, so the documents packed in a window would attend to each "
       "other and only the window's first document would follow the learned prompt; Strata packs every window "
       "(use llama_adapter: learned prompts that every token sees, packing kept)"
    for t in ("prompt_tuning", "prefix_tuning")}
# Strata's short keys -> the peft config's names, per type.
RENAMED = {"lora": {"alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules"},
           "ia3": {"targets": "target_modules", "feedforward": "feedforward_modules"},
           "llama_adapter": {"length": "adapter_len", "layers": "adapter_layers"}}
BOTTLENECK_KEYS = ("size", "placement")
_PEFT_CLASS = {"lora": "LoraConfig", "ia3": "IA3Config", "llama_adapter": "AdaptionPromptConfig"}


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
    if kind in REFUSED:
        problems.add(f"{ap}.type", f"{kind} is not supported: {REFUSED[kind]}")
        return
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
