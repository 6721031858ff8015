"""Memory-lean training end to end: checkpointing + chunked loss change no loss, with ZeRO-3,
frozen blocks (LLaMA-Pro), RHO-1 and a resume; and the speed/memory fields of the step log."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import (
    general_then_code,
    prepared_recipe,
    recipe_dict,
    step_metrics,
    strata,
    train_here,
    write_recipe,
)
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.train.throughput import Throughput, flops_per_token, peak_tflops


def test_flops_count_frozen_parameters_without_weight_gradient():
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, use_cache=False)
    model = LlamaForCausalLM(config)
    embed = model.model.embed_tokens.weight.numel()
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    rest = sum(p.numel() for p in model.parameters()) - embed - 2 * block  # head + final norm
    attention = 12 * 2 * 4 * 16 * 64
    assert flops_per_token(model, 64) == 6 * (2 * block + rest) + attention  # the lookup table is not a matmul
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    assert flops_per_token(model, 64) == 4 * block + 6 * (block + rest) + attention
    tied = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True}))
    assert flops_per_token(tied, 64) == 6 * (2 * block + embed + 64) + attention  # the head is the table


def test_mfu_uses_the_gpu_table_or_the_override_and_is_omitted_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cuda")) == 989.0
    assert peak_tflops(torch.device("cpu")) is None and peak_tflops(torch.device("cpu"), 2.0) == 2.0
    speed = Throughput(1e9, None, torch.device("cpu"), world_size=2).metrics(tokens_per_s=4000.0)
    assert speed["tokens_per_s_per_device"] == 2000.0 and speed["tflops_per_device"] == pytest.approx(2.0)
    assert "mfu" not in speed and speed["peak_memory_gb"] > 0.05  # this process's peak RSS
    assert Throughput(1e9, 4.0, torch.device("cpu"), 2).metrics(4000.0)["mfu"] == pytest.approx(0.5)


@pytest.mark.slow
def test_checkpointed_zero3_run_with_frozen_blocks_rho1_and_resume_matches_plain(tmp_path):
    stages = general_then_code(tmp_path, (3, 4), docs=12)
    stages[1]["expand"] = {"method": "llama_pro", "add_layers": 2, "freeze_old": True}
    stages[1]["selection"] = {"method": "rho1", "ratio": 0.6, "reference": "general"}
    raw = recipe_dict(tmp_path, stages, checkpoint={"every": 2, "keep": 2}, deepspeed={"zero_stage": 1})
    plain = prepared_recipe(tmp_path, raw)
    lean = write_recipe(tmp_path, {**raw, "deepspeed": {"zero_stage": 3}, "train": {"activation_checkpointing": True}},
                        "lean.yaml")
    train_here(plain, tmp_path / "plain")
    strata(["train", lean, "--run-dir", tmp_path / "lean"], fault="kill@2:3", expect="killed")
    proc = strata(["train", lean, "--run-dir", tmp_path / "lean"])
    assert "activation checkpointing on 4 of 4 blocks" in proc.stdout
    got, want = step_metrics(tmp_path / "lean"), step_metrics(tmp_path / "plain")
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-4)  # ZeRO-3 sums in another order
    assert "selected_fraction" in got[-1]  # the stage really ran RHO-1
    rows = [yaml.safe_load(line) for line in (tmp_path / "lean" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_s_per_device"] > 0 and r["tflops_per_device"] > 0 and r["peak_memory_gb"] > 0
               for r in rows)
    assert not any("mfu" in r for r in rows)  # no peak for a CPU
    assert " tok/s/dev | " in proc.stdout + proc.stderr
