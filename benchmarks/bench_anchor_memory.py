"""theta* + F held per rank by an EWC stage, under ZeRO-2 and ZeRO-3, on 1 and 2 ranks.

    python benchmarks/bench_anchor_memory.py [--out bench_out/anchor_memory] [--zero 2 3] [--ranks 1 2]

A 33.9M-parameter Llama (hidden 512, 8 layers, the demo tokenizer's 8,000 pieces) trains one step
of one stage with `regularize: {method: ewc}`, its Fisher on one micro-batch of the `pretraining:`
corpus (the demo's English), fp32 on the CPU, once per ZeRO stage and number of ranks (`strata
train`, under torchrun for 2). The number is the stage's own log line, "this rank holds X MiB of
them": rank 0's theta* and F (pipeline/train/anchor.py's `Anchor.bytes`). Prints a table and
writes OUT/anchor_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = """\
name: anchor-memory
seed: 1
tokenizer: {repo}/tokenizers/demo.model
model:
  init: {{arch: llama, hidden_size: 512, num_layers: 8, num_heads: 8, intermediate_size: 1408}}
seq_len: 64
batch: {{micro: 2, global: 4}}
deepspeed: {{zero_stage: {zero}}}
data: {{dir: {data}}}
pretraining:
  - {{name: en, path: {repo}/data_recipes/demo/en.jsonl.zst}}
stages:
  - name: code
    tokens: 256
    sources: [{{name: py, path: {repo}/data_recipes/demo/code.jsonl.zst}}]
    schedule: {{max_lr: 1.0e-4}}
    regularize: {{method: ewc, fisher_tokens: 128}}
"""
HELD = re.compile(r"this rank holds ([\d,.]+) MiB")


def strata(args: list[str], ranks: int) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = ([str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    proc = subprocess.run([*launcher, "-m", "pipeline", *args], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "anchor_memory")
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for zero in args.zero:
        recipe = args.out / f"zero{zero}.yaml"
        recipe.write_text(RECIPE.format(repo=REPO, zero=zero, data=args.out / "data"))
        strata(["prepare", str(recipe), "--quiet"], 1)
        for ranks in args.ranks:
            out = strata(["train", str(recipe), "--run-dir", str(args.out / f"run-zero{zero}-{ranks}")], ranks)
            held = HELD.search(out)
            results.append({"zero_stage": zero, "ranks": ranks, "mib_per_rank": float(held[1].replace(",", ""))})
            print(f"ZeRO-{zero}, {ranks} rank(s): theta* + F {results[-1]['mib_per_rank']:.1f} MiB per rank", flush=True)
    (args.out / "anchor_memory.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
