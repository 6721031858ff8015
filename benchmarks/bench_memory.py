"""Peak memory and time of one training step: plain, activation checkpointing, chunked loss, both.

    python benchmarks/bench_memory.py [--vocab 128000] [--seq-len 2048] [--micro 2] [--steps 2]

A Llama with a large vocabulary and a small width (the case where the logits dominate memory),
fp32 on the CPU. Each variant runs in its own child process, so its peak RSS is its own:
* plain: the full float32 logits and `F.cross_entropy` over them (Strata's loss before issue 15);
* ckpt: the same loss, every block checkpointed (`train.activation_checkpointing: true`);
* chunked: Strata's loss (pipeline/model/loss.py), head + loss per chunk of tokens;
* both: checkpointing and the chunked loss.
A step is forward, backward and AdamW's step on a packed batch (two documents per window); the
last of --steps is timed. Every variant starts from the same weights and batch, so the losses
must agree. Prints a table and writes bench_out/memory.json. Aim: both <= 1/3 of plain's peak
memory, <= 1.35x its step time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = {"plain": (False, False), "ckpt": (True, False), "chunked": (False, True), "both": (True, True)}
SIZE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4}


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def plain_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1), ignore_index=-100)


def child(variant: str, args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.model.loss import causal_lm_loss
    from pipeline.model.runtime import apply_training_options
    from pipeline.recipe.spec import Train

    ckpt, chunked = VARIANTS[variant]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, max_position_embeddings=args.seq_len, use_cache=False, **SIZE)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).train()
    apply_training_options(model, Train(activation_checkpointing=ckpt), "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    ids = torch.randint(0, args.vocab, (args.micro, args.seq_len + 1))
    half = args.seq_len // 2
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
             "position_ids": torch.cat([torch.arange(half), torch.arange(args.seq_len - half)]).repeat(args.micro, 1)}
    before = rss_gib()
    losses, seconds = [], 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = causal_lm_loss(model, batch) if chunked else plain_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        losses.append(loss.item())
    return {"variant": variant, "peak_rss_gib": rss_gib(), "before_step_gib": before, "step_s": seconds,
            "losses": losses, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--out", default="bench_out/memory.json")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args.variant, args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--vocab", str(args.vocab), "--seq-len",
               str(args.seq_len), "--micro", str(args.micro), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{variant:8s} done", file=sys.stderr, flush=True)
    base = rows[0]
    print(f"vocab {args.vocab:,}, width {SIZE['hidden_size']}, {SIZE['num_hidden_layers']} blocks, seq_len "
          f"{args.seq_len}, micro {args.micro}, fp32 CPU ({base['threads']} threads); the last of {args.steps} steps")
    print(f"{'variant':8s} | {'peak RSS GiB':>12s} | {'step GiB':>8s} | {'x plain':>7s} | {'step s':>7s} | "
          f"{'x plain':>7s} | losses")
    for r in rows:
        step_mem = r["peak_rss_gib"] - r["before_step_gib"]
        r["memory_ratio"] = r["peak_rss_gib"] / base["peak_rss_gib"]
        r["time_ratio"] = r["step_s"] / base["step_s"]
        r["max_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        print(f"{r['variant']:8s} | {r['peak_rss_gib']:12.2f} | {step_mem:8.2f} | {r['memory_ratio']:7.2f} | "
              f"{r['step_s']:7.2f} | {r['time_ratio']:7.2f} | {' '.join(f'{x:.6f}' for x in r['losses'])}")
    worst = max(r["max_loss_diff"] for r in rows)
    print(f"largest loss difference to plain: {worst:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "size": SIZE, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
