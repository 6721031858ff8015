"""Planner experiment: does `strata sweep` predict full German runs after English from its proxies?

    python benchmarks/sweep_experiment.py [--budgets 0.3,1.0] [--replay 0,0.1,0.3] [--out bench_out/sweep]

A small model carried from the demo's English prose to its German (real text, the demo tokenizer):
stage `english` (ENGLISH_STEPS steps), then stage `german` (GERMAN_STEPS steps) whose replay of
English is swept. For each budget, `strata sweep` fits the law on its proxies and writes a plan;
then the German stage is trained in full at three ratios (the smallest and largest swept and the
first plan's recommendation, or a middle swept value when it is one of those), each as `strata sweep --only V --fractions 1` so that it starts from
the same base as the proxies. The script reports, per plan and ratio, the predicted and measured
held-out loss of both domains at the full budget, their relative error, and the measured rise of
English against its tolerance. Results: bench_out/sweep.json and the run folder under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 176}
SEQ_LEN, MICRO, GLOBAL = 128, 8, 16
ENGLISH_STEPS, GERMAN_STEPS = 100, 120


def write_recipe(out: Path) -> Path:
    per_step = SEQ_LEN * GLOBAL
    schedule = {"warmup": 0.05, "max_lr": 3e-3, "min_lr": 3e-4, "decay": "cosine"}
    raw = {"name": "sweep-experiment", "seed": 1234, "tokenizer": str(REPO / "tokenizers" / "demo.model"),
           "model": {"init": MODEL}, "seq_len": SEQ_LEN, "batch": {"micro": MICRO, "global": GLOBAL},
           "deepspeed": {"zero_stage": 0}, "data": {"dir": str(out / "data"), "heldout": 0.05},
           "checkpoint": {"every": 0}, "train": {"eval_tokens": 20_000},
           "stages": [
               {"name": "english", "tokens": ENGLISH_STEPS * per_step, "schedule": schedule,
                "sources": [{"name": "en", "path": str(REPO / "data_recipes/demo/en.jsonl.zst")}]},
               {"name": "german", "tokens": GERMAN_STEPS * per_step, "schedule": schedule, "replay": {"ratio": 0.25},
                "sources": [{"name": "de", "path": str(REPO / "data_recipes/demo/de.jsonl.zst")}]}]}
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def strata(*args: object) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"strata {' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.3,1.0")
    ap.add_argument("--replay", default="0,0.1,0.3")
    ap.add_argument("--out", default="bench_out/sweep")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe, run_dir = write_recipe(out), out / "run"
    strata("prepare", recipe, "--quiet")
    plans, seconds = {}, {}
    for budget in args.budgets.split(","):
        start = time.time()
        print(strata("sweep", recipe, "--stage", "german", "--replay", args.replay, "--budget", budget,
                     "--run-dir", run_dir)[-3000:], flush=True)
        seconds[f"sweep {budget}"] = round(time.time() - start)
        shutil.copy(run_dir / "sweeps" / "german" / "plan.json", out / f"plan-{budget}.json")
        plans[budget] = json.loads((out / f"plan-{budget}.json").read_text())
    swept = [float(v) for v in args.replay.split(",")]
    first = plans[args.budgets.split(",")[0]]
    ratios = {min(swept), max(swept), first["recommended"]}
    ratios = sorted(ratios | set(sorted(set(swept) - ratios)[:3 - len(ratios)]))  # three, when the plan picked an end
    measured = {}
    for r in ratios:
        start = time.time()
        strata("sweep", recipe, "--stage", "german", "--replay", f"{r:g}", "--fractions", "1", "--budget", "1",
               "--only", f"{r:g}", "--run-dir", run_dir)
        seconds[f"full {r:g}"] = round(time.time() - start)
        folder = run_dir / "sweeps" / "german" / f"{r:g}" / f"{GERMAN_STEPS}steps"
        measured[f"{r:g}"] = json.loads((folder / "eval.json").read_text())["loss"]["german"]
    rows = []
    for budget, plan in plans.items():
        for r in ratios:
            pred, meas = plan["predicted"][f"{r:g}"], measured[f"{r:g}"]
            rows.append({"budget": float(budget), "ratio": r, "recommended": plan["recommended"],
                         "predicted": pred, "measured": meas,
                         "error": {d: pred[d] / meas[d] - 1 for d in meas},
                         "measured_rise_en": meas["en"] / plan["before"]["en"] - 1,
                         "predicted_rise_en": pred["en"] / plan["before"]["en"] - 1})
    results = {"rows": rows, "seconds": seconds, "tolerance": first["tolerance"], "before": first["before"],
               "fits": {b: p["fits"] for b, p in plans.items()}, "machine": os.uname().nodename,
               "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(json.dumps(rows, indent=1))
    print(write_results("sweep", results))


if __name__ == "__main__":
    main()
