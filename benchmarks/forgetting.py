"""Forgetting experiment: English, then German, defended by each family against forgetting.

    python benchmarks/forgetting.py [--docs 150] [--steps 40 40] [--out bench_out/forgetting]   (make forgetting)

On the demo corpus (real text: the first `--docs` documents of English prose and of German), a
tiny Llama (hidden 64, 2 layers, seq_len 64, 8 sequences per step) trains `--steps` steps of
English, then of German, once per defence:

    nothing          German only
    replay 25%       replay: {ratio: 0.25} of English
    distill          distill: {teacher: previous, weight 1, temperature 2, on: all}
    l2               regularize: {method: l2, weight 0.01}
    ewc              regularize: {method: ewc, weight 50, fisher_tokens 32768}
    merge            merge: {method: linear, weight 0.5, with: previous}
    replay + distill replay 25% and distill on the replayed samples

Each run goes through `strata train` (which evaluates the held-out 5% of each source after every
stage). The table reports FGT on loss after German (how far the English held-out loss rose above
its best; lower is better) and German's held-out loss after its stage (lower is better), written
to OUT/results.json, OUT/results.md and OUT/forgetting.png. A few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
import zstandard

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "nothing": {},
    "replay 25%": {"replay": {"ratio": 0.25}},
    "distill": {"distill": {"teacher": "previous", "weight": 1.0, "temperature": 2.0}},
    "l2": {"regularize": {"method": "l2", "weight": 0.01}},
    "ewc": {"regularize": {"method": "ewc", "weight": 50.0, "fisher_tokens": 32768}},
    "merge": {"merge": {"method": "linear", "weight": 0.5, "with": "previous"}},
    "replay + distill": {"replay": {"ratio": 0.25},
                         "distill": {"teacher": "previous", "weight": 1.0, "temperature": 2.0, "on": "replay"}},
}


def subset(name: str, docs: int, out: Path) -> Path:
    with open(REPO / "data_recipes" / "demo" / f"{name}.jsonl.zst", "rb") as f:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        lines = [line for _, line in zip(range(docs), text)]
    path = out / f"{name}.jsonl"
    path.write_text("".join(lines))
    return path


def recipe(out: Path, en: Path, de: Path, steps: tuple[int, int], german: dict) -> dict:
    sched = {"warmup": 0.1, "max_lr": 3e-3, "min_lr": 3e-4, "decay": "cosine"}
    return {
        "name": "forgetting", "seed": 7, "tokenizer": str(REPO / "tokenizers" / "demo.model"),
        "model": {"init": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}},
        "seq_len": 64, "batch": {"micro": 8, "global": 8}, "data": {"dir": str(out / "data"), "heldout": 0.05},
        "checkpoint": {"every": 0}, "train": {"eval_tokens": 16384, "log_every": 10},
        "stages": [
            {"name": "english", "tokens": 8 * 64 * steps[0], "sources": [{"name": "en", "path": str(en)}],
             "schedule": sched},
            {"name": "german", "tokens": 8 * 64 * steps[1], "sources": [{"name": "de", "path": str(de)}],
             "schedule": sched, **german},
        ],
    }


def strata(*args: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"strata {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["defence"] for r in rows]
    for ax, key, title in ((axes[0], "fgt", "forgetting of English (FGT on loss, lower is better)"),
                           (axes[1], "german_loss", "German held-out loss after its stage (lower is better)")):
        ax.barh(names, [r[key] for r in rows])
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=150)
    parser.add_argument("--steps", type=int, nargs=2, default=[40, 40])
    parser.add_argument("--out", default="bench_out/forgetting")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    en, de = subset("en", args.docs, out), subset("de", args.docs, out)
    rows = []
    for k, (name, german) in enumerate(VARIANTS.items()):
        path = out / f"recipe-{k}.yaml"
        path.write_text(yaml.safe_dump(recipe(out, en, de, tuple(args.steps), german), sort_keys=False))
        if k == 0:
            strata("prepare", str(path), "--quiet")
        run = out / f"run-{k}"
        start = time.perf_counter()
        strata("train", str(path), "--run-dir", str(run))
        ev = json.loads((run / "eval.json").read_text())
        rows.append({"defence": name, "fgt": ev["metrics"]["loss"]["FGT"]["german"],
                     "english_loss": ev["loss"]["german"]["en"], "german_loss": ev["loss"]["german"]["de"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = ["| defence | FGT (loss) after German | English loss | German loss | seconds |", "|---|---|---|---|---|"]
    table += [f"| {r['defence']} | {r['fgt']:.3f} | {r['english_loss']:.3f} | {r['german_loss']:.3f} | {r['seconds']} |"
              for r in rows]
    (out / "results.md").write_text("\n".join(table) + "\n")
    plot(rows, out / "forgetting.png")
    print("\n".join(table))


if __name__ == "__main__":
    main()
