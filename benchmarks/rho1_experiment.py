"""RHO-1 experiment: does token selection against a clean reference help on a noisy corpus?

    python benchmarks/rho1_experiment.py [--tokens 300000] [--noise 0.5] [--ratio 0.6] [--out bench_out/rho1]

On the demo's English prose (real text), its documents shuffled (seed 0) and split:
* clean reference text (120 documents): a reference model is trained on it (`strata train`,
  `--ref-tokens`, about two passes by default);
* target corpus: 120 other clean documents mixed with injected noise, `--noise` of the tokens (two sources of
  the stage, so metrics.jsonl's per-source `selected_share` shows what the selection kept); the
  noise documents are half random-character strings, half word salad (words drawn uniformly
  from the corpus vocabulary);
* held out: the remaining 46 documents, clean, never trained on.
Two target runs from the same initial model and the same token budget: without selection, and
with RHO-1 (`ratio`, global-batch scope, precomputed by `strata score` with the reference). The
script reports each model's loss on the held-out clean text, and the share of the noise tokens
and of the clean tokens that the selection kept (mean over the steps of metrics.jsonl). Runs in a few minutes on a
2-core CPU; results go to OUT/results.json.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
import zstandard

REPO = Path(__file__).resolve().parents[1]
MODEL = {"arch": "llama", "hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 352}
SEQ_LEN = 128


def demo_docs() -> list[str]:
    with open(REPO / "data_recipes" / "demo" / "en.jsonl.zst", "rb") as f:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        return [json.loads(line)["text"] for line in text]


def noise_docs(clean: list[str], count: int, seed: int) -> list[str]:
    """Half random-character strings, half word salad, each as long as a clean document."""
    rng = random.Random(seed)
    words = sorted({w for d in clean for w in d.split()})
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-_/#@%&*()[]{}<>"
    out = []
    for i in range(count):
        length = len(rng.choice(clean))
        if i % 2 == 0:
            out.append("".join(rng.choice(alphabet) for _ in range(length)))
        else:
            salad, n = [], 0
            while n < length:
                salad.append(rng.choice(words))
                n += len(salad[-1]) + 1
            out.append(" ".join(salad))
    return out


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def recipe(out: Path, name: str, sources: list[dict], tokens: int, selection: dict | None = None) -> Path:
    stage = {"name": name, "tokens": tokens, "sources": sources,
             "schedule": {"warmup": 0.05, "max_lr": 2e-3, "min_lr": 2e-4, "decay": "cosine"}}
    if selection:
        stage["selection"] = selection
    raw = {"name": name, "seed": 1234, "tokenizer": str(REPO / "tokenizers" / "demo.model"),
           "model": {"init": MODEL}, "seq_len": SEQ_LEN, "batch": {"micro": 8, "global": 16},
           "deepspeed": {"zero_stage": 0}, "data": {"dir": str(out / "data"), "heldout": 0.0},
           "checkpoint": {"every": 0}, "stages": [stage]}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def strata(*args: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"strata {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


@torch.no_grad()
def heldout_loss(model_dir: Path, texts: list[str]) -> float:
    """Mean next-token loss over the held-out texts, packed into seq_len windows like training."""
    from pipeline.data.packer import pack
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.model.build import load_pretrained
    from pipeline.train.reference import token_losses

    tok = load_tokenizer(REPO / "tokenizers" / "demo.model")
    ids = np.concatenate([np.append(np.asarray(t, dtype=np.int64), tok.eos_id) for t in tok.encode_batch(texts)])
    n = (len(ids) - 1) // SEQ_LEN
    windows = np.stack([ids[k * SEQ_LEN:k * SEQ_LEN + SEQ_LEN + 1] for k in range(n)])
    model = load_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for start in range(0, n, 16):
        inputs, labels, positions = pack(windows[start:start + 16], tok.eos_id)
        batch = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                 "position_ids": torch.from_numpy(positions)}
        losses = token_losses(model, batch)
        total += float(losses.sum())
        count += losses.numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300_000, help="token budget of every run")
    parser.add_argument("--ref-tokens", type=int, default=600_000, help="token budget of the reference")
    parser.add_argument("--noise", type=float, default=0.5, help="share of the target tokens that are noise")
    parser.add_argument("--ratio", type=float, default=0.6, help="RHO-1 selection ratio")
    parser.add_argument("--out", default="bench_out/rho1")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    docs = demo_docs()
    random.Random(0).shuffle(docs)
    ref_docs, target_docs, heldout = docs[:120], docs[120:240], docs[240:]
    clean_src = {"name": "clean", "path": str(write_jsonl(out / "clean.jsonl", ref_docs))}
    target = [{"name": "target", "path": str(write_jsonl(out / "target.jsonl", target_docs)), "weight": 1 - args.noise},
              {"name": "noise", "path": str(write_jsonl(out / "noise.jsonl", noise_docs(target_docs, 200, seed=0))),
               "weight": args.noise}]

    ref = recipe(out, "reference", [clean_src], args.ref_tokens)
    base = recipe(out, "baseline", target, args.tokens)
    ref_hf = out / "runs" / "reference" / "stages" / "01-reference" / "hf"
    sel = recipe(out, "rho1", target, args.tokens,
                 {"method": "rho1", "ratio": args.ratio, "reference": str(ref_hf), "scoring": "precomputed"})
    for r in (ref, base):
        strata("prepare", str(r), "--quiet")
    print(f"training the reference on clean text ({args.ref_tokens:,} tokens) ...", flush=True)
    strata("train", str(ref), "--run-dir", str(out / "runs" / "reference"))
    print("training the baseline on the noisy corpus ...", flush=True)
    strata("train", str(base), "--run-dir", str(out / "runs" / "baseline"))
    print("scoring the noisy corpus with the reference, then training with RHO-1 ...", flush=True)
    strata("score", str(sel), "--stage", "rho1", "--quiet")
    strata("train", str(sel), "--run-dir", str(out / "runs" / "rho1"))

    results = {"tokens": args.tokens, "reference_tokens": args.ref_tokens, "noise_tokens": args.noise, "ratio": args.ratio}
    for name in ("reference", "baseline", "rho1"):
        loss = heldout_loss(out / "runs" / name / "stages" / f"01-{name}" / "hf", heldout)
        results[name] = {"heldout_loss": round(loss, 4), "heldout_ppl": round(math.exp(loss), 2)}
    rows = [json.loads(line) for line in (out / "runs" / "rho1" / "metrics.jsonl").read_text().splitlines()]
    results["rho1"]["selected_fraction"] = round(float(np.mean([r["selected_fraction"] for r in rows])), 4)
    results["rho1"]["mean_excess_loss"] = round(float(np.mean([r["excess_loss"] for r in rows])), 4)
    for source in ("target", "noise"):
        shares = [r["selected_share"][source] for r in rows if r["selected_share"][source] is not None]
        results["rho1"][f"kept_{source}_tokens"] = round(float(np.mean(shares)), 4)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
