"""Data benchmark: prepare throughput, and the stream against a raw read of the same token arrays.

    python benchmarks/bench_data.py [--recipe data_recipes/demo.yaml] [--workers 2] [--steps 200]

* prepare: tokens/s of `strata prepare` for every source of the recipe (fresh data folder),
  with 1 and with --workers processes.
* datasets: the same tokens grouped and iterated through Hugging Face `datasets` (run_clm.py style).
* stream: tokens/s of the last stage's StageStream (its own source + replayed sources, mixed,
  packed, rank-sliced, as torch batches), against the same number of windows cut from the
  decompressed token arrays held in memory and stacked into torch batches (the fastest a
  loader could be: no mixing, no shuffling, no document boundaries).
Results are printed and written to bench_out/data.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np
import torch
from results import write_results  # benchmarks/results.py (scripts run from benchmarks/)

from pipeline.data.shards import load_shard, prepare_source, shard_paths
from pipeline.data.stream import StageStream
from pipeline.data.tokenizer import load_tokenizer
from pipeline.recipe.load import load_recipe


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


def bench_datasets(recipe, steps: int) -> dict:
    """The same tokens through Hugging Face `datasets`, the run_clm.py way: the documents grouped
    into seq_len + 1 blocks with a batched map (timed apart), then iterated in micro-batches as torch
    tensors (timed like the stream)."""
    import datasets

    name = recipe.stages[-1].sources[0].name
    docs = []
    for p, m in shard_paths(recipe, name):
        values, offsets = load_shard(p, m["sha256"])
        docs += [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    block = recipe.seq_len + 1
    ds = datasets.Dataset.from_dict({"input_ids": docs})

    def group(batch):
        flat = [t for doc in batch["input_ids"] for t in doc]
        n = len(flat) // block * block
        return {"input_ids": [flat[i:i + block] for i in range(0, n, block)]}

    start = time.perf_counter()
    grouped = ds.map(group, batched=True, batch_size=1000).with_format("torch")
    map_seconds = time.perf_counter() - start
    micro = recipe.batch.micro
    batches = steps * (recipe.batch.global_ // micro)
    per_epoch = len(grouped) // micro
    start = time.perf_counter()
    done = 0
    while done < batches:
        for batch in grouped.iter(batch_size=micro, drop_last_batch=True):
            ids = batch["input_ids"]
            _ = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
            done += 1
            if done == batches:
                break
        if per_epoch == 0:
            break
    seconds = time.perf_counter() - start
    tokens = done * micro * recipe.seq_len
    # The way the HF Trainer reads it: a DataLoader indexing examples one by one, then collating.
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    loader = DataLoader(grouped, batch_size=micro, collate_fn=default_data_collator, drop_last=True)
    start, done2 = time.perf_counter(), 0
    for batch in loader:
        _ = batch["input_ids"][:, :-1], batch["input_ids"][:, 1:]
        done2 += 1
        if done2 == min(batches, 200):
            break
    per_example = done2 * micro * recipe.seq_len / (time.perf_counter() - start)
    return {"source": name, "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds),
            "map_seconds": round(map_seconds, 3), "dataloader_tokens_per_s": round(per_example)}


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
    hf = bench_datasets(recipe, min(args.steps, 300))
    results.update(stream=stream, raw=raw, datasets=hf,
                   stream_vs_raw=round(stream["tokens_per_s"] / raw["tokens_per_s"], 3),
                   stream_vs_datasets=round(stream["tokens_per_s"] / hf["tokens_per_s"], 1),
                   stream_vs_datasets_dataloader=round(stream["tokens_per_s"] / hf["dataloader_tokens_per_s"], 1))
    print(f"stream   {len(stream['sources'])} sources mixed + packed: {stream['tokens_per_s']:>12,} tokens/s")
    print(f"raw read of the token arrays:           {raw['tokens_per_s']:>12,} tokens/s")
    print(f"HF datasets, batched .iter() as torch:    {hf['tokens_per_s']:>12,} tokens/s "
          f"(+ {hf['map_seconds']:.1f} s to group)")
    print(f"HF datasets, DataLoader per example:      {hf['dataloader_tokens_per_s']:>12,} tokens/s")
    print(f"stream / raw: {results['stream_vs_raw']:.0%} (aim >= 30%); stream / datasets: "
          f"{results['stream_vs_datasets']:.1f}x batched, {results['stream_vs_datasets_dataloader']:.1f}x "
          f"per example (aim >= 10x)")
    write_results("data", results)


if __name__ == "__main__":
    main()
