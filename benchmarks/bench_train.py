"""Trainer benchmark: Strata's training step against a bare DeepSpeed loop, and the data wait.

    python benchmarks/bench_train.py [--recipe data_recipes/demo.yaml] [--steps 20]

For each model size, in one process on the CPU (fp32):
* Strata: `Trainer` runs one stage of --steps steps on the recipe's first stage data (its stream,
  schedule, logging); the mean `step_s` of metrics.jsonl after 3 warm-up steps, and the share of
  it spent waiting for the stream (`data_s`).
* bare: the same model, AdamW, DeepSpeed config and batches (taken from the same stream into
  memory beforehand) in the shortest loop DeepSpeed allows: forward, engine.backward, engine.step.
Results are printed and written to bench_out/train.json. Aim: Strata / bare <= 1.05.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results import write_results  # benchmarks/results.py (scripts run from benchmarks/)

from pipeline.data.stream import StageStream
from pipeline.data.tokenizer import load_tokenizer
from pipeline.model.build import build_model
from pipeline.model.loss import causal_lm_loss
from pipeline.recipe.load import load_recipe, parse_recipe
from pipeline.train.trainer import Trainer, deepspeed_config, open_training

SIZES = {"tiny": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 352},
         "small": {"hidden_size": 256, "num_layers": 6, "num_heads": 8, "intermediate_size": 704}}
WARMUP = 3


def one_stage_recipe(base, size: dict, steps: int):
    raw = copy.deepcopy(base.raw)
    raw["model"] = {"init": {"arch": "llama", **size}}
    stage = raw["stages"][0]
    stage["tokens"] = steps * raw["batch"]["global"] * raw["seq_len"]
    raw["stages"] = [stage]
    raw["checkpoint"] = {"every": 0}
    raw["deepspeed"] = {"zero_stage": 1}
    raw.pop("evaluation", None)  # the demo's downstream tasks are mapped to stages this recipe drops
    return parse_recipe(raw, base.file, Path(base.file).parent)


def bench_strata(recipe, run_dir: Path) -> dict:
    with open_training(recipe, run_dir) as run:
        trainer = Trainer(recipe, run_dir, run)
        try:
            trainer.train()
        finally:
            trainer.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][WARMUP:]
    step = statistics.mean(r["step_s"] for r in rows)
    data = statistics.mean(r["data_s"] for r in rows)
    return {"step_s": round(step, 4), "data_share": round(data / step, 4)}


def bench_bare(recipe, steps: int) -> dict:
    import deepspeed

    tok = load_tokenizer(recipe.tokenizer)
    stream = StageStream(recipe, 0)
    batches = [next(stream) for _ in range(steps * stream.grad_accum)]
    model = build_model(recipe, tok.vocab_size, tok.eos_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(recipe, 1, bf16=False), dist_init_required=False)
    times = []
    for s in range(steps):
        start = time.perf_counter()
        for m in range(stream.grad_accum):
            loss = causal_lm_loss(engine, batches[s * stream.grad_accum + m])
            engine.backward(loss)
            engine.step()
        times.append(time.perf_counter() - start)
    return {"step_s": round(statistics.mean(times[WARMUP:]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="data_recipes/demo.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    base = load_recipe(args.recipe)
    results = {}
    for name in args.sizes:
        recipe = one_stage_recipe(base, SIZES[name], args.steps)
        with tempfile.TemporaryDirectory() as tmp:
            strata = bench_strata(recipe, Path(tmp) / "run")
        bare = bench_bare(recipe, args.steps)
        ratio = strata["step_s"] / bare["step_s"]
        results[name] = {"strata": strata, "bare": bare, "ratio": round(ratio, 3)}
        print(f"{name:<6} strata {strata['step_s'] * 1000:8.1f} ms/step (data wait {strata['data_share']:.1%})  "
              f"bare DeepSpeed {bare['step_s'] * 1000:8.1f} ms/step  ratio {ratio:.3f} (aim <= 1.05)", flush=True)
    write_results("train", results)


if __name__ == "__main__":
    main()
