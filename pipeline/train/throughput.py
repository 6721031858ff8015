"""Speed and memory of a training step, for the step log and metrics.jsonl.

Model FLOPs per token follow the usual accounting (Kaplan et al.; torchtitan, Megatron):

* 6 per parameter of a weight matrix that trains (2 forward, 2 for the input gradient, 2 for the
  weight gradient), but 4 per frozen parameter (no weight gradient: LLaMA-Pro's old blocks,
  `trainable:` subsets). The input embedding table is a lookup, not a matmul, and is left out
  unless it is tied to the output head.
* plus attention's own matmuls (scores and the weighted sum): 12 x layers x heads x head_dim x
  seq_len per token, counted over the whole window (an upper bound for packed documents, as
  torchtitan counts it).

Checkpointing's recomputation is not counted: these are *model* FLOPs, so MFU does not rise when
work is repeated. MFU divides by the device's dense bf16 peak from `PEAK_TFLOPS` or
`train.peak_tflops`; on CPU, or an unknown device without the override, MFU is left out.
Peak memory is CUDA's max allocated since the previous log line, or the process's peak RSS on CPU.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

# Dense bf16 TFLOP/s without sparsity, by a substring of torch.cuda.get_device_name(), first match wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("MI300X", 1307.0)]


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of `model` (the bare Hugging Face model, before DeepSpeed partitions it)."""
    lookup = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is lookup
    total = 0.0
    for p in model.parameters():
        if p is lookup and not tied:
            continue
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 keeps the full size here
        total += (6 if p.requires_grad else 4) * numel
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return total + 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since the last call (CUDA), or of the whole process so far (CPU peak RSS)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


@dataclass
class Throughput:
    flops_per_token: float
    peak: float | None  # TFLOP/s per device, None where unknown
    device: torch.device
    world_size: int

    @classmethod
    def for_model(cls, model: torch.nn.Module, seq_len: int, device: torch.device, world_size: int,
                  override: float | None = None) -> Throughput:
        return cls(flops_per_token(model, seq_len), peak_tflops(device, override), device, world_size)

    def metrics(self, tokens_per_s: float) -> dict[str, float]:
        """tokens_per_s is of all ranks together; the rest is per device."""
        per_device = tokens_per_s / self.world_size
        tflops = per_device * self.flops_per_token / 1e12
        out = {"tokens_per_s_per_device": per_device, "tflops_per_device": tflops}
        if self.peak:
            out["mfu"] = tflops / self.peak
        out["peak_memory_gb"] = peak_memory_gb(self.device)
        return out

    @staticmethod
    def describe(m: dict[str, float]) -> str:
        """The log line's part: '1,234 tok/s/dev | 12.3 TFLOP/s | MFU 41.0% | 10.2 GB'."""
        mfu = f" | MFU {m['mfu']:.1%}" if "mfu" in m else ""
        return (f"{m['tokens_per_s_per_device']:,.0f} tok/s/dev | {m['tflops_per_device']:.2f} TFLOP/s{mfu} | "
                f"{m['peak_memory_gb']:.2f} GB")
