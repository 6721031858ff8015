"""Data benchmark: prepare throughput, and the stream against a raw read of the same token arrays.

    python benchmarks/bench_data.py [--recipe data_recipes/demo.yaml] [--workers 2] [--steps 200]

* prepare: tokens/s of `strata prepare` for every source of the recipe (fresh data folder),
  with 1 and with --workers processes.
* stream: tokens/s of the last stage's StageStream (its own source + replayed sources, mixed,
  packed, rank-sliced, as torch batches), against the same number of windows cut from the
  decompressed token arrays held in memory and stacked into torch batches (the fastest a
  loader could be: no mixing, no shuffling, no document boundaries).
Results are printed and written to bench_out/data.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.recipe import load_recipe
from pipeline.shards import load_shard, prepare_source, shard_paths
from pipeline.stream import StageStream
from pipeline.tokenizer import load_tokenizer


def bench_prepare(recipe, workers: int) -> dict:
    tokenizer = load_tokenizer(recipe.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, dir=tmp))
        start = time.perf_counter()
        tokens = sum(prepare_source(s, fresh, tokenizer, workers=workers, progress=False).tokens
                     for s in fresh.all_sources())
        seconds = time.perf_counter() - start
    return {"workers": workers, "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds)}


def bench_stream(recipe, steps: int) -> dict:
    stage = len(recipe.stages) - 1
    stream = StageStream(recipe, stage)
    stream.steps = None  # endless: measure as many steps as asked, whatever the stage's budget
    batches = steps * stream.grad_accum
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    tokens = batches * recipe.batch.micro * recipe.seq_len
    return {"stage": recipe.stages[stage].name, "sources": stream.names, "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds)}


def bench_raw(recipe, steps: int) -> dict:
    """Windows of seq_len + 1 cut in order from in-memory token arrays, stacked like the stream's batches."""
    name = recipe.stages[-1].sources[0].name
    flat = np.concatenate([load_shard(p, m["sha256"])[0] for p, m in shard_paths(recipe, name)])
    L, micro = recipe.seq_len, recipe.batch.micro
    per_epoch = (len(flat) - 1) // L
    batches = steps * (recipe.batch.global_ // micro)
    start = time.perf_counter()
    k = 0
    for _ in range(batches):
        rows = []
        for _ in range(micro):
            w = flat[(k % per_epoch) * L:(k % per_epoch) * L + L + 1].astype(np.int64)
            rows.append((w[:-1], w[1:]))
            k += 1
        _ = {"input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),
             "labels": torch.from_numpy(np.stack([r[1] for r in rows]))}
    seconds = time.perf_counter() - start
    tokens = batches * micro * L
    return {"source": name, "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="data_recipes/demo.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)

    results = {"prepare": [bench_prepare(recipe, 1), bench_prepare(recipe, args.workers)]}
    for r in results["prepare"]:
        print(f"prepare  {r['workers']} worker(s): {r['tokens_per_s']:>12,} tokens/s ({r['tokens']:,} tokens)")
    # the stream reads the recipe's own data folder: prepare it if needed (no-op when up to date)
    tokenizer = load_tokenizer(recipe.tokenizer)
    for src in recipe.all_sources():
        prepare_source(src, recipe, tokenizer, workers=args.workers, progress=False)
    stream, raw = bench_stream(recipe, args.steps), bench_raw(recipe, args.steps)
    results.update(stream=stream, raw=raw, stream_vs_raw=round(stream["tokens_per_s"] / raw["tokens_per_s"], 3))
    print(f"stream   {len(stream['sources'])} sources mixed + packed: {stream['tokens_per_s']:>12,} tokens/s")
    print(f"raw read of the token arrays:           {raw['tokens_per_s']:>12,} tokens/s")
    print(f"stream / raw: {results['stream_vs_raw']:.0%} (aim >= 30%)")
    out = Path("bench_out")
    out.mkdir(exist_ok=True)
    (out / "data.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
