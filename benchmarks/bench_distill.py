"""Peak memory and time of one distillation step: full logits (before) vs chunked (now).

    python benchmarks/bench_distill.py [--vocab 32000] [--seq-len 2048] [--micro 1]

A student and a teacher Llama with a large vocabulary and a small width, fp32 on the CPU, each
variant in its own child process so that its peak RSS is its own:
* full: student and teacher logits in full, CE + KL over them (Strata's distillation before);
* chunked: `Distillation.losses` (pipeline/train/objectives.py): both heads, CE and KL per chunk.
A step is the forward of both models and the student's backward (no optimizer). Both variants
start from the same weights and batch, so CE and KL must agree. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SIZE = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4}


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(variant: str, args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.recipe.forgetting import Distill
    from pipeline.train.objectives import Distillation, distillation_kl

    config = LlamaConfig(vocab_size=args.vocab, max_position_embeddings=args.seq_len, use_cache=False, **SIZE)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32))
    student, teacher = models[0].train(), models[1].eval().requires_grad_(False)
    ids = torch.randint(0, args.vocab, (args.micro, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
             "position_ids": torch.arange(args.seq_len).repeat(args.micro, 1)}
    spec = Distill(weight=1.0, temperature=2.0)
    before, start = rss_gib(), time.perf_counter()
    if variant == "full":
        kw = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        logits = student(**kw).logits
        with torch.no_grad():
            t = teacher(**kw).logits.float()
        ce = F.cross_entropy(logits.reshape(-1, args.vocab).float(), batch["labels"].reshape(-1))
        kl = distillation_kl(logits, t, batch["labels"] != -100, spec.temperature)
    else:
        ce, kl = Distillation(spec, teacher, own_sources=1).losses(student, batch)
    (ce + spec.weight * spec.temperature ** 2 * kl).backward()
    return {"variant": variant, "peak_rss_gib": round(rss_gib(), 3), "step_added_gib": round(rss_gib() - before, 3),
            "seconds": round(time.perf_counter() - start, 2), "ce": ce.item(), "kl": kl.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--child", choices=["full", "chunked"])
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(1)
        print(json.dumps(child(args.child, args)))
        return
    for variant in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--child", variant, "--vocab", str(args.vocab),
               "--seq-len", str(args.seq_len), "--micro", str(args.micro)]
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
