"""GPU throughput: Strata's training step against a bare DeepSpeed loop, Llama-3.2-1B-shaped.

    make bench-gpu                       # torchrun on every visible GPU
    torchrun --standalone --nproc_per_node=8 benchmarks/bench_gpu.py [--seq-len 4096] [--micro 2]

A model with Llama-3.2-1B's shape (16 blocks, width 2048, GQA 32/8 heads, 128,256-entry tied
vocabulary), initialised from scratch (nothing is downloaded), bf16 under ZeRO-1, seq_len 4096, on
synthetic token ids packed two documents per window. Variants, each a fresh engine on the same
weights and batches:
* bare: the shortest DeepSpeed loop: `engine(input_ids, labels=...)` (Hugging Face's loss over
  full logits), engine.backward, engine.step;
* strata: Strata's own `Trainer.train_step` (LR set, chunked or Liger loss, NaN guard, grad norm)
  with `train.attention: auto` (or --attention; bare uses the same backend);
* strata+ckpt: the same with `train.activation_checkpointing: true`.
For each: tokens/s per GPU, model TFLOP/s per GPU and MFU (pipeline/train/throughput.py's count
and peak table), and peak memory (max allocated). --warmup steps are run first, then --steps are
timed. Prints a table (rank 0) and writes bench_out/gpu.json. Aim: strata >= 45% MFU on one H100
and within 3% of bare's tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

LLAMA_32_1B = {"vocab_size": 128_256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
               "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500_000.0,
               "tie_word_embeddings": True}


class SyntheticStream:
    """What Trainer.train_step reads of a stream: grad_accum and next() -> a packed micro-batch (CPU)."""

    grad_accum = 1

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches, self.i = batches, 0

    def __next__(self) -> dict[str, torch.Tensor]:
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]


def synthetic_batches(n: int, micro: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    cut = seq_len * 3 // 5  # two documents per window: positions restart at the cut
    pos = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)]).repeat(micro, 1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro, seq_len + 1), generator=g)
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "position_ids": pos})
    return out


def build(args, dist, ckpt: bool):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.model.runtime import apply_training_options
    from pipeline.recipe.spec import Train
    from pipeline.train.throughput import Throughput
    from pipeline.train.trainer import deepspeed_config

    config = LlamaConfig(**LLAMA_32_1B, max_position_embeddings=args.seq_len, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, dtype=torch.float32)
    train = Train(attention=args.attention, activation_checkpointing=ckpt)
    options = apply_training_options(model, train, dist.device)
    throughput = Throughput.for_model(model, args.seq_len, dist.device, dist.world_size, args.peak_tflops)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    recipe = SimpleNamespace(batch=SimpleNamespace(micro=args.micro, global_=args.micro * dist.world_size),
                             deepspeed={"zero_stage": 1}, train=train, file="bench_gpu")
    ds = deepspeed_config(recipe, dist.world_size, bf16=True)  # the config Strata trains with
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    return engine, optimizer, throughput, options


def bare_step(engine, stream, device) -> None:
    batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
    loss = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                  use_cache=False).loss  # Hugging Face shifts the labels again: a different loss, the same work
    engine.backward(loss)
    engine.step()


def run_variant(name: str, args, dist, batches) -> dict:
    from pipeline.train.failures import StepGuard
    from pipeline.train.objectives import Objective
    from pipeline.train.trainer import Trainer

    engine, optimizer, throughput, options = build(args, dist, ckpt=name == "strata+ckpt")
    stream = SyntheticStream(batches)
    trainer = SimpleNamespace(selection=None, dist=dist, guard=StepGuard(5, dist.rank, dist.world_size),
                              objective=Objective())  # what train_step reads of a Trainer
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    step = ((lambda: bare_step(engine, stream, dist.device)) if name == "bare" else
            (lambda: Trainer.train_step(trainer, engine, optimizer, stream, 1e-4)))
    cuda = dist.device.type == "cuda"  # the CPU only for a smoke run of this script (tests, no numbers)
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dist.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.micro * args.seq_len * dist.world_size / seconds
    row = {"variant": name, "options": options, "step_s": seconds, **throughput.metrics(tokens_per_s)}
    engine.destroy()  # DeepSpeed's hooks and buffers; then free this variant before the next one is built
    engine = optimizer = step = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default="bare,strata,strata+ckpt")
    parser.add_argument("--attention", default="auto", help="train.attention for every variant (auto: "
                        "flash_attention_2 when flash-attn is installed, else sdpa)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak table")
    parser.add_argument("--out", default="bench_out/gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device visible; run it on a GPU machine (make bench-gpu)")
    from pipeline.distributed import join

    dist = join(deepspeed_engine=True)
    batches = synthetic_batches(4, args.micro, args.seq_len, LLAMA_32_1B["vocab_size"], seed=dist.rank)
    rows = [run_variant(v, args, dist, batches) for v in args.variants.split(",")]
    if dist.rank != 0:
        return
    gpu = torch.cuda.get_device_name(dist.device)
    print(f"Llama-3.2-1B shape, seq_len {args.seq_len}, micro {args.micro}, bf16 ZeRO-1, "
          f"{dist.world_size} x {gpu}, torch {torch.__version__}")
    bare = next((r for r in rows if r["variant"] == "bare"), None)
    print("| variant | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB | vs bare |\n|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        vs = f"{r['tokens_per_s_per_device'] / bare['tokens_per_s_per_device']:.3f}" if bare else "n/a"
        print(f"| {r['variant']} ({', '.join(r['options'])}) | {r['tokens_per_s_per_device']:,.0f} | "
              f"{r['tflops_per_device']:.1f} | {mfu} | {r['peak_memory_gb']:.1f} | {vs} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"gpu": gpu, "world_size": dist.world_size, "args": vars(args),
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
