"""Prepare benchmark: `strata prepare` against what a user would otherwise write with `datasets`.

    python benchmarks/bench_prepare.py [--input data_recipes/demo] [--tokenizer tokenizers/demo.model] [--workers 2]

Both tokenize the same files with the same tokenizer and write Arrow, from a cold start (no cache):

* strata: `prepare_source` on one source made of every .jsonl.zst file under --input (read,
  tokenize with --workers processes, split held-out documents, write zstd Arrow shards + manifest).
* datasets: `load_dataset("json", data_files=...)` + `.map(batched=True, num_proc=N)` calling the
  same tokenizer's encode_batch + `save_to_disk` (Arrow), with its cache in a fresh folder.

Each is run with 1 and with --workers processes; tokens/s counts the tokens written. Results are
printed and written to bench_out/prepare.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from results import write_results  # benchmarks/results.py (scripts run from benchmarks/)

from pipeline.data.shards import prepare_source
from pipeline.data.tokenizer import load_tokenizer
from pipeline.recipe.load import parse_recipe

_tokenizer = None  # one per `datasets` worker process


def _tokenize(batch: dict, tokenizer_path: str) -> dict:
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = load_tokenizer(tokenizer_path)
    return {"input_ids": _tokenizer.encode_batch(batch["text"])}


def bench_strata(files: list[Path], tokenizer_path: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        raw = {"name": "bench", "tokenizer": tokenizer_path, "model": {"init": {}}, "seq_len": 256,
               "batch": {"micro": 1, "global": 1}, "data": {"dir": tmp},
               "stages": [{"name": "s", "schedule": {"max_lr": 1e-3},
                           "sources": [{"name": "corpus", "path": str(files[0].parent)}]}]}
        recipe = parse_recipe(raw)
        source = dataclasses.replace(recipe.stages[0].sources[0])
        start = time.perf_counter()
        r = prepare_source(source, recipe, load_tokenizer(tokenizer_path), workers=workers, progress=False)
        seconds = time.perf_counter() - start
        manifest = json.loads((Path(tmp) / "corpus" / "manifest.json").read_text())
    tokens = r.tokens + manifest["heldout"]["tokens"]
    return {"workers": workers, "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


def bench_datasets(files: list[Path], tokenizer_path: str, workers: int) -> dict:
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train",
                                   cache_dir=f"{tmp}/cache")
        ds = ds.map(_tokenize, batched=True, batch_size=512, num_proc=workers if workers > 1 else None,
                    remove_columns=ds.column_names, fn_kwargs={"tokenizer_path": tokenizer_path})
        ds.save_to_disk(f"{tmp}/out")
        seconds = time.perf_counter() - start
        tokens = sum(len(x) for batch in ds.iter(4096) for x in batch["input_ids"])
    return {"workers": workers, "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="data_recipes/demo")
    parser.add_argument("--tokenizer", default="tokenizers/demo.model")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    files = sorted(Path(args.input).glob("*.jsonl.zst"))
    tokenizer = str(Path(args.tokenizer).resolve())
    results = {"files": [str(f) for f in files], "strata": [], "datasets": []}
    for workers in sorted({1, args.workers}):
        results["strata"].append(bench_strata(files, tokenizer, workers))
        results["datasets"].append(bench_datasets(files, tokenizer, workers))
        for name in ("strata", "datasets"):
            r = results[name][-1]
            print(f"{name:<9} {workers} worker(s): {r['tokens']:>10,} tokens in {r['seconds']:6.2f} s = "
                  f"{r['tokens_per_s']:>10,} tokens/s", flush=True)
    write_results("prepare", results)


if __name__ == "__main__":
    main()
