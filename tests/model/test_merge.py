"""`strata merge`: the merged folder loads offline and its weights equal each method's formula."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.cli import main


def tiny(path, seed: int) -> dict[str, torch.Tensor]:
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a64, b64 = a.double().flatten(), b.double().flatten()
    dot = float((a64 / a64.norm()) @ (b64 / b64.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a64 + t * b64).view(a.shape)
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)).view(a.shape)


def ties(w: float, base: torch.Tensor, trained: torch.Tensor, density: float = 0.5) -> torch.Tensor:
    delta = (trained - base).double().flatten()
    k = int(density * delta.numel())
    keep = torch.zeros_like(delta, dtype=torch.bool)
    keep[delta.abs().topk(k).indices] = True
    return (base.double().flatten() + w * torch.where(keep, delta, 0.0)).view(base.shape)


@pytest.mark.parametrize("method", ["linear", "slerp", "ties"])
def test_merged_export_loads_and_equals_the_formula(tmp_path, method, capsys):
    a, b = tiny(tmp_path / "a", 1), tiny(tmp_path / "b", 2)
    out = tmp_path / "out"
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--method", method, "--weight", "0.3",
                 "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).state_dict()
    for name, theta in merged.items():
        if method == "linear":
            want = 0.7 * a[name].double() + 0.3 * b[name].double()
        elif method == "slerp":
            want = slerp(0.3, a[name], b[name])
        else:
            want = ties(0.3, a[name], b[name])
        if method == "ties" and a[name].ndim < 2:
            continue  # norms are equal in a and b (ones): nothing to trim
        torch.testing.assert_close(theta.double(), want, rtol=1e-5, atol=1e-6, msg=f"{method} {name}")
    assert "merged" in capsys.readouterr().out


def test_merge_of_a_missing_folder_is_one_line(tmp_path, capsys):
    tiny(tmp_path / "a", 1)
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "nope: not a Hugging Face model folder" in err and "Traceback" not in err
