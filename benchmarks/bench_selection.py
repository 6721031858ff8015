"""RHO-1 benchmark: step time of plain training against selection with precomputed and online scores.

    python benchmarks/bench_selection.py [--recipe data_recipes/demo.yaml] [--steps 8]

One process on the CPU (fp32), one DeepSpeed engine (ZeRO 1) with the `tiny` model of
bench_train.py, the recipe's first-stage batches held in memory, and a reference model of the
same size (its weights do not change the cost). The configurations take turns step by step (plain,
precomputed, online, each scope), so a busy machine slows all of them alike; the median step time
per configuration is reported. Precomputed scores come from `score_stage` (its time is shown, not
counted in the step). Aims: precomputed / plain <= 1.05, online / plain <= 1.5.
Results are printed and written to bench_out/selection.json.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results import write_results  # benchmarks/results.py (scripts run from benchmarks/)

from pipeline.data.context import StageContext
from pipeline.data.stream import StageStream
from pipeline.data.tokenizer import load_tokenizer
from pipeline.model.build import build_model
from pipeline.recipe.load import load_recipe, parse_recipe
from pipeline.recipe.spec import Selection
from pipeline.train.objectives import Objective
from pipeline.train.reference import load_frozen
from pipeline.train.scoring import ScoreStore, score_stage
from pipeline.train.selection import Rho1
from pipeline.train.step import Step
from pipeline.train.trainer import deepspeed_config, init_distributed

SIZE = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 352}


class Batches:
    """A step's micro-batches from memory, shaped like the stream the trainer passes around."""

    def __init__(self, batches: list, grad_accum: int):
        self.batches, self.grad_accum, self.i = batches, grad_accum, 0

    def __next__(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


def main() -> None:
    import deepspeed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="data_recipes/demo.yaml")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    init_distributed()  # a world of one
    base = load_recipe(args.recipe)
    raw = copy.deepcopy(base.raw)
    raw["model"] = {"init": {"arch": "llama", **SIZE}}
    stage = raw["stages"][0]
    stage["tokens"] = args.steps * raw["batch"]["global"] * raw["seq_len"]
    raw["stages"] = [stage]
    raw["deepspeed"] = {"zero_stage": 1}
    raw.pop("evaluation", None)  # the demo's downstream tasks are mapped to stages this recipe drops
    recipe = parse_recipe(raw, base.file, Path(base.file).parent)
    tok = load_tokenizer(recipe.tokenizer)
    stream = StageStream(recipe, 0)
    accum = stream.grad_accum
    batches = [next(stream) for _ in range(args.steps * accum)]
    model = build_model(recipe, tok.vocab_size, tok.eos_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(recipe, 1, bf16=False), dist_init_required=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(parse_recipe({**raw, "seed": recipe.seed + 1}, base.file, Path(base.file).parent),
                    tok.vocab_size, tok.eos_id).save_pretrained(tmp / "ref")
        reference = load_frozen(tmp / "ref", StageContext.single_process(recipe, 0))
        scored = parse_recipe({**raw, "stages": [{**stage, "selection": {
            "method": "rho1", "reference": str(tmp / "ref"), "scoring": "precomputed"}}]},
            base.file, Path(base.file).parent)
        start = time.perf_counter()
        score_stage(scored, stage["name"], tmp, progress=False)
        score_s = time.perf_counter() - start
        store = ScoreStore.for_stage(scored, 0)
        store.meta = store.read_meta()
        names = [stage["sources"][0]["name"]]
        configs = {"plain": None}
        for scoring in ("precomputed", "online"):
            for scope in ("global_batch", "micro_batch"):
                sel = Selection(reference="ref", ratio=0.6, scoring=scoring, scope=scope)
                configs[f"{scoring}/{scope}"] = (Rho1(sel, names, 1, scores=store) if scoring == "precomputed"
                                                 else Rho1(sel, names, 1, reference=reference))
        times: dict[str, list[float]] = {k: [] for k in configs}
        for s in range(args.steps + 1):  # step 0 warms every path up and is not counted
            for name, rho1 in configs.items():
                source = Batches(batches[s % args.steps * accum:][:accum], accum)
                start = time.perf_counter()
                Step(Objective(), rho1)(engine, source, torch.device("cpu"))  # the trainer's one step
                if s:
                    times[name].append(time.perf_counter() - start)
        shutil.rmtree(store.folder)  # the benchmark's scores do not belong in the data folder
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nRHO-1 step time: {recipe.batch.global_} x {recipe.seq_len} tokens per step, grad_accum {accum}, "
          f"tiny model, 1 process on CPU, median of {args.steps} interleaved steps")
    print(f"{'configuration':<26} {'s/step':>8} {'x plain':>8}  aim")
    for key, value in median.items():
        aim = "<= 1.05" if key.startswith("precomputed") else "<= 1.5" if key.startswith("online") else ""
        print(f"{key:<26} {value:8.3f} {value / median['plain']:8.2f}  {aim}")
    print(f"scoring the {args.steps} steps once (strata score): {score_s:.1f} s")
    write_results("selection", {
        "median_step_s": median, "x_plain": {k: round(v / median["plain"], 3) for k, v in median.items()},
        "score_s": score_s, "grad_accum": accum})


if __name__ == "__main__":
    main()
