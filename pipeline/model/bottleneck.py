"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020), a small module of Strata's own.

`adapter: {type: bottleneck, size, placement}` inserts, after a sublayer's output projection and
before its residual add, h -> h + up(relu(down(h))) with `up` zero-initialised, so the adapted
model computes exactly the model it starts from. `placement: houlsby` adapts the attention
output (o_proj) and the MLP output (down_proj) of every block; `pfeiffer` the MLP output only.
Everything else is frozen.

Why not the `adapters` library (the maintained home of these adapters): its releases pin
transformers ~= 4.57, and Strata runs transformers 5, so it cannot be installed beside it.

Saving and loading. The adapter is not merged (the nonlinearity makes that impossible): a
stage's export keeps the base model (hf/, plain names) and the adapter beside it (adapter/:
adapter_config.json and adapter_model.safetensors); `load_bottleneck(base, adapter)` rebuilds the
adapted model and gives the logits Strata evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import StrataError
from pipeline.files import replace_dir, temp_dir_for, write_json_atomic

PLACEMENTS = {"houlsby": ("self_attn.o_proj", "mlp.down_proj"), "pfeiffer": ("mlp.down_proj",)}
MARK = "bottleneck_"  # in the name of every adapter parameter
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class Bottleneck(nn.Module):
    """base_layer(x) + up(relu(down(base_layer(x)))), `up` zero at the start."""

    def __init__(self, base_layer: nn.Linear, size: int):
        super().__init__()
        self.base_layer = base_layer
        width = base_layer.out_features
        self.bottleneck_down = nn.Linear(width, size, dtype=base_layer.weight.dtype, device=base_layer.weight.device)
        self.bottleneck_up = nn.Linear(size, width, dtype=base_layer.weight.dtype, device=base_layer.weight.device)
        nn.init.zeros_(self.bottleneck_up.weight)
        nn.init.zeros_(self.bottleneck_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return h + self.bottleneck_up(torch.relu(self.bottleneck_down(h)))


def options(adapter: dict[str, Any]) -> tuple[int, str]:
    size, placement = adapter.get("size", 64), adapter.get("placement", "houlsby")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise StrataError(f"adapter.size: must be an integer > 0, got {size!r}")
    if placement not in PLACEMENTS:
        raise StrataError(f"adapter.placement: must be houlsby or pfeiffer, got {placement!r}")
    return size, placement


def add_bottleneck(model: nn.Module, adapter: dict[str, Any], seed: int) -> nn.Module:
    """Freeze `model` and insert the adapters (seeded; the caller's RNG is untouched)."""
    size, placement = options(adapter)
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in model.model.layers:
            for path in PLACEMENTS[placement]:
                owner_name, attr = path.split(".")
                owner = getattr(layer, owner_name)
                setattr(owner, attr, Bottleneck(getattr(owner, attr), size))
    model.strata_bottleneck = {"type": "bottleneck", "size": size, "placement": placement}
    return model


def is_bottleneck(model: nn.Module) -> bool:
    return hasattr(model, "strata_bottleneck")


def save_bottleneck(model: nn.Module, out: Path) -> None:
    """adapter_config.json and the adapter's weights (only theirs) into the folder `out`."""
    from safetensors.torch import save_file

    tmp = temp_dir_for(out)
    save_file({n: p.detach().cpu().contiguous() for n, p in model.state_dict().items() if MARK in n},
              str(tmp / WEIGHTS))
    write_json_atomic(tmp / CONFIG, model.strata_bottleneck)
    replace_dir(tmp, out)


def load_bottleneck(base: str | Path, adapter: str | Path) -> nn.Module:
    """The model a bottleneck stage trained: its base export with the saved adapter."""
    from safetensors.torch import load_file

    from pipeline.model.build import load_pretrained

    config = json.loads((Path(adapter) / CONFIG).read_text())
    model = add_bottleneck(load_pretrained(base), config, seed=0)
    missing = model.load_state_dict(load_file(str(Path(adapter) / WEIGHTS)), strict=False).missing_keys
    if any(MARK in n for n in missing):
        raise StrataError(f"{adapter}: the adapter lacks weights of {len([n for n in missing if MARK in n])} layer(s)")
    return model.eval()
