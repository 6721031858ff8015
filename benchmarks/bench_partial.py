"""Partial training benchmark: step time and trainable share of a full, a LoRA and an MoE stage.

    python benchmarks/bench_partial.py [--recipe data_recipes/demo.yaml] [--steps 8]

The demo recipe's model (fp32, CPU) trains on batches of the recipe's shape (micro-batch x
seq_len, random token ids: only the arithmetic matters here) with AdamW over what each variant
trains: every parameter (full), a peft LoRA r=16 on q/k/v/o (its base frozen), and the model
upcycled into 4 experts, top-2 (every parameter trains). The loop is Strata's loss
(`causal_lm_loss`, with the MoE balance term) and a plain optimizer step, without DeepSpeed, so
the numbers compare the models, not the engine. Mean step time after 2 warm-up steps; results
are printed and written to bench_out/partial.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from results import write_results  # benchmarks/results.py (scripts run from benchmarks/)

from pipeline.data.tokenizer import load_tokenizer
from pipeline.model.adapters import add_adapter
from pipeline.model.build import build_model
from pipeline.model.experts import router_metrics, upcycle
from pipeline.model.loss import causal_lm_loss
from pipeline.model.trainable import optimizer_groups, trainable_count
from pipeline.recipe.load import load_recipe

WARMUP = 2


def variants(recipe, vocab: int):
    yield "full", build_model(recipe, vocab)
    yield "lora r=16 (q,k,v,o)", add_adapter(build_model(recipe, vocab), {
        "type": "lora", "r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}, seed=0)
    yield "moe 4 experts top-2", upcycle(build_model(recipe, vocab), experts=4, top_k=2, seed=0)


def time_steps(model: torch.nn.Module, batch: dict, steps: int) -> float:
    opt = torch.optim.AdamW(optimizer_groups(model, 0.1), lr=1e-4)
    model.train()
    times = []
    for _ in range(steps + WARMUP):
        start = time.perf_counter()
        causal_lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        router_metrics(model)
        times.append(time.perf_counter() - start)
    return statistics.mean(times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="data_recipes/demo.yaml")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    vocab = load_tokenizer(recipe.tokenizer).vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (recipe.batch.micro, recipe.seq_len + 1), generator=gen)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
             "position_ids": torch.arange(recipe.seq_len).expand(recipe.batch.micro, -1)}
    rows = []
    print(f"{recipe.file}: micro-batch {recipe.batch.micro} x seq_len {recipe.seq_len}, fp32, "
          f"{torch.get_num_threads()} thread(s)")
    for name, model in variants(recipe, vocab):
        trainable, total = trainable_count(model)
        step = time_steps(model, batch, args.steps)
        rows.append({"variant": name, "parameters": total, "trainable": trainable,
                     "trainable_share": trainable / total, "step_s": step})
        print(f"  {name:<22} {total:>11,} params  {trainable:>11,} train ({trainable / total:7.2%})  "
              f"{step * 1000:8.1f} ms/step")
    write_results("partial", rows)


if __name__ == "__main__":
    main()
