"""Forgetting experiment: English, then German, defended by each family against forgetting.

    python benchmarks/forgetting.py [--docs 150] [--steps 40 40] [--out bench_out/forgetting] [--tried]
                                                                                     (make forgetting)

On the demo corpus (real text: the first `--docs` documents of English prose and of German), a
tiny Llama (hidden 64, 2 layers, seq_len 64, 8 sequences per step) trains `--steps` steps of
English, then of German, once per defence:

    nothing          German only
    replay 25%       replay: {ratio: 0.25} of English
    distill          distill: {teacher: previous, weight 1, temperature 2, on: all}
    l2               regularize: {method: l2, weight 0.01}
    ewc              regularize: {method: ewc, weight 1e4, fisher_tokens 32768}
    merge            merge: {method: linear, weight 0.5, with: previous}
    replay + distill replay 25% and distill on the replayed samples

`--tried` runs instead the other values tried for the defaults (TRIED below), for docs/forgetting.md.

Each run goes through `strata train` (which evaluates the held-out 5% of each source after every
stage). The table reports FGT on loss after German (how far the English held-out loss rose above
its best; lower is better) and German's held-out loss after its stage (lower is better), and for a
merge both losses of the trained weights before the merge (eval.json's loss_unmerged), written to
OUT/results.json, OUT/results.md and OUT/forgetting.png (OUT/tried.* with --tried). A finished run
folder is reused (`strata train` only fills in missing evaluations); delete OUT to start over.
About 2.5 minutes per variant on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
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
    "ewc": {"regularize": {"method": "ewc", "weight": 1.0e4, "fisher_tokens": 32768}},
    "merge": {"merge": {"method": "linear", "weight": 0.5, "with": "previous"}},
    "replay + distill": {"replay": {"ratio": 0.25},
                         "distill": {"teacher": "previous", "weight": 1.0, "temperature": 2.0, "on": "replay"}},
}
TRIED = {  # other values of the defences' weights, run with --tried; docs/forgetting.md says what they gave
    "ewc, weight 50": {"regularize": {"method": "ewc", "weight": 50.0, "fisher_tokens": 32768}},
    "ewc, weight 1e5": {"regularize": {"method": "ewc", "weight": 1.0e5, "fisher_tokens": 32768}},
    "l2, weight 0.03": {"regularize": {"method": "l2", "weight": 0.03}},
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


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_variant(out: Path, name: str, german: dict, en: Path, de: Path, steps: tuple[int, int]) -> dict:
    """Train (or reuse) one variant's run folder; its row of the table."""
    path = out / f"recipe-{slug(name)}.yaml"
    path.write_text(yaml.safe_dump(recipe(out, en, de, steps, german), sort_keys=False))
    strata("prepare", str(path), "--quiet")  # incremental: only the first variant tokenizes
    run, timing = out / f"run-{slug(name)}", out / f"run-{slug(name)}.seconds"
    start = time.perf_counter()
    strata("train", str(path), "--run-dir", str(run))  # a finished run only fills in missing evaluations
    if not timing.is_file():
        timing.write_text(f"{time.perf_counter() - start:.1f}\n")
    ev = json.loads((run / "eval.json").read_text())
    before = ev.get("loss_unmerged", {}).get("german", {})
    return {"defence": name, "recipe": german, "fgt": ev["metrics"]["loss"]["FGT"]["german"],
            "english_loss": ev["loss"]["german"]["en"], "german_loss": ev["loss"]["german"]["de"],
            "unmerged": [before["en"], before["de"]] if before else None,
            "seconds": float(timing.read_text())}


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
        values = [r[key] for r in rows]
        ax.barh(names, values)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        if key == "german_loss":  # zoom in on the differences (the axis does not start at 0)
            ax.set_xlim(min(values) - 0.1, max(values) + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=150)
    parser.add_argument("--steps", type=int, nargs=2, default=[40, 40])
    parser.add_argument("--out", default="bench_out/forgetting")
    parser.add_argument("--tried", action="store_true", help="run the other values tried (TRIED), not VARIANTS")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    en, de = subset("en", args.docs, out), subset("de", args.docs, out)
    rows = []
    for name, german in (TRIED if args.tried else VARIANTS).items():
        rows.append(run_variant(out, name, german, en, de, tuple(args.steps)))
        print(json.dumps(rows[-1]), flush=True)
    stem = "tried" if args.tried else "results"
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    table = ["| defence | FGT (loss) after German | English loss | German loss | before the merge: English / German "
             "| seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        before = "{:.3f} / {:.3f}".format(*r["unmerged"]) if r["unmerged"] else "–"
        table.append(f"| {r['defence']} | {r['fgt']:.3f} | {r['english_loss']:.3f} | {r['german_loss']:.3f} | "
                     f"{before} | {r['seconds']:.0f} |")
    (out / f"{stem}.md").write_text("\n".join(table) + "\n")
    plot(rows, out / ("tried.png" if args.tried else "forgetting.png"))
    print("\n".join(table))


if __name__ == "__main__":
    main()
