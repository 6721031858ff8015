"""Scale benchmark: the data layer against a cluster run's counts, by simulation.

    python benchmarks/bench_scale.py [--sources 1000] [--stages 10] [--shards 100] [--quick]

Builds synthetic prepared data: `--sources` sources over `--stages` stages (each stage replays
every earlier one, so the last stage mixes every source), `--shards` shards per source. Every
shard of every manifest is a symbolic link to one real shard (1,000 documents of 1,000 tokens), so
the manifests, the plan and the stream see 10^5 shards for real; documents and tokens are then
10^8 / 10^11 instead of 10^9 / 10^12, which changes no cost measured here except the shard
buffers (they scale with data.shard_tokens, reported per source and extrapolated).

Each measurement runs in a fresh process (time and peak RSS): `strata check`; the plan alone;
the stream's start-up on one rank of a 1024-rank world; its first step resumed at a cursor far
into the stage; the resume state's size; the mixer's cost per step. Then the same at fewer
sources and shards, to show what grows with what. Then `strata prepare` throughput on a real
corpus: one process, --workers 2, and an array of 2 tasks, with the time in reading,
tokenizing, n-gram indexing and writing. Results: printed, and bench_out/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import write_results  # benchmarks/results.py (scripts run from benchmarks/)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's `pipeline`, also in this process
DOCS, DOC_TOKENS = 1000, 1000  # of the one real shard every manifest entry links to


def build(root: Path, sources: int, stages: int, shards: int) -> Path:
    """A recipe and prepared manifests at the given counts; its path."""
    import hashlib

    import numpy as np

    from pipeline.data.shards import ShardWriter, fingerprint

    real = root / "real"
    real.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(real, "train", np.dtype(np.uint16), DOCS * DOC_TOKENS)
    rng = np.random.default_rng(0)
    for _ in range(DOCS):
        writer.add(rng.integers(3, 8000, DOC_TOKENS, dtype=np.uint16))
    writer.flush()
    shard = writer.shards[0]
    (root / "dummy.jsonl").write_text('{"text": "x"}\n')
    per_stage = sources // stages
    lines = [f"name: scale\ntokenizer: {REPO / 'tokenizers' / 'demo.model'}\nseq_len: 4096",
             "model: {init: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}",
             "batch: {micro: 1, global: 1024}", f"data: {{dir: {root / 'data'}, heldout: 0.0, max_passes: 1000000}}",
             "stages:"]
    for s in range(stages):
        lines.append(f"  - name: s{s}\n    tokens: {10**11 // stages}\n    schedule: {{max_lr: 1.0e-4}}")
        if s:
            lines.append("    replay: {ratio: 0.5}")
        lines.append("    sources:")
        for k in range(per_stage):
            name = f"src{s:02d}_{k:04d}"
            lines.append(f"      - {{name: {name}, path: {root / 'dummy.jsonl'}}}")
            folder = root / "data" / name
            folder.mkdir(parents=True, exist_ok=True)
            entries = []
            for j in range(shards):
                file = f"train-{j:05d}.arrow"
                if not (folder / file).exists():
                    os.symlink(real / shard["file"], folder / file)  # (a hard link count is capped at 65,000)
                entries.append({**shard, "file": file})
            manifest = {"schema_version": 1, "source": name, "key": hashlib.sha256(name.encode()).hexdigest()[:16],
                        "path": str(root / "dummy.jsonl"), "tokenizer": {"hash": "0" * 64, "vocab_size": 8000, "eos_id": 2},
                        "dtype": "uint16", "documents": DOCS * shards, "tokens": DOCS * DOC_TOKENS * shards,
                        "shards": entries, "heldout": {"documents": 0, "tokens": 0, "shards": []},
                        "out_of_range": 0, "empty": 0, "skipped_total": 0, "skipped": {}}
            manifest["fingerprint"] = fingerprint(manifest)
            (folder / "manifest.json").write_text(json.dumps(manifest))
    recipe = root / "scale.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


PLAN = """
from pipeline.data.shards import prepared_tokens
from pipeline.recipe.load import load_recipe
from pipeline.recipe.plan import build_plan
recipe = load_recipe(RECIPE)
plans = build_plan(recipe, prepared_tokens(recipe))
out = {"components_last_stage": len(plans[-1].mixture)}
"""

STREAM = """
import json, time
from pipeline.data.stream import StageStream
from pipeline.recipe.load import load_recipe
recipe = load_recipe(RECIPE)
t = time.perf_counter()
stream = StageStream(recipe, len(recipe.stages) - 1, rank=0, world_size=1024)
out = {"startup_s": time.perf_counter() - t}
state = stream.state_dict()
far = stream.steps * recipe.batch.global_ // 2  # half-way into the stage
state["samples"] = far
state["counts"] = {n: int(far * c.share) for n, c in zip(stream.names, stream.plan.mixture)}
state["cursors"] = {n: state["stage_start"][n] + state["counts"][n] for n in stream.names}
t = time.perf_counter()
stream.load_state_dict(state)
next(stream)
out["resume_first_step_s"] = time.perf_counter() - t
out["state_bytes"] = len(json.dumps(stream.state_dict() if not stream._pending else state))
counts = [0] * len(stream.names)
t = time.perf_counter()
stream.mixer.assign(counts, 0, recipe.batch.global_)
out["mixer_per_step_s"] = time.perf_counter() - t
"""


def measure(snippet: str, recipe: Path) -> dict:
    """Run `snippet` (it sets `out`) in a fresh process: its numbers, wall seconds and peak RSS."""
    code = (f"import json, resource, time\nRECIPE = {str(recipe)!r}\n_t = time.perf_counter()\n{snippet}\n"
            "out['wall_s'] = time.perf_counter() - _t\n"
            "out['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\nprint(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}


def check(recipe: Path) -> dict:
    import resource

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "check", str(recipe)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    return {"wall_s": round(wall, 2), "peak_rss_mb_max_so_far": round(rss)}


def scale_rows(root: Path, grid: list[tuple[int, int, int]]) -> list[dict]:
    rows = []
    for sources, stages, shards in grid:
        recipe = build(root / f"{sources}x{shards}", sources, stages, shards)
        row = {"sources": sources, "stages": stages, "shards": sources * shards,
               "plan": measure(PLAN, recipe), "stream": measure(STREAM, recipe)}
        if sources == grid[-1][0] and shards == grid[-1][2]:
            row["check"] = check(recipe)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", type=int, default=1000)
    parser.add_argument("--stages", type=int, default=10)
    parser.add_argument("--shards", type=int, default=100, help="per source")
    parser.add_argument("--quick", action="store_true", help="the full counts only, no growth grid, no prepare")
    parser.add_argument("--prepare-only", action="store_true", help="only the prepare throughput")
    args = parser.parse_args()
    full = (args.sources, args.stages, args.shards)
    grid = [full] if args.quick else [(args.sources // 10, args.stages, args.shards), (args.sources // 3, args.stages, args.shards),
                                      (args.sources, args.stages, args.shards // 10), full]
    with tempfile.TemporaryDirectory() as tmp:
        results = {"machine": machine(), "scale": [] if args.prepare_only else scale_rows(Path(tmp), grid)}
        if not args.quick:
            results["prepare"] = prepare_rows(Path(tmp) / "prepare")
    print(f"written to {write_results('scale', results)}")


def corpus(root: Path, files: int, docs: int) -> Path:
    """`files` jsonl.zst files of `docs` real demo documents each (English, German, code, cycled)."""
    import zstandard

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import demo_docs

    texts = [r["text"] for name in ("en", "de", "code") for r in demo_docs(name)]
    folder = root / "corpus"
    folder.mkdir(parents=True)
    for f in range(files):
        lines = [json.dumps({"text": f"{f}.{k} " + texts[(f * docs + k) % len(texts)]}) for k in range(docs)]
        (folder / f"part-{f:03d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return folder


def phases(recipe_path: Path) -> dict:
    """Seconds of one process in each phase of preparing the recipe's one source."""
    from pipeline.data.dedup import sign
    from pipeline.data.ngrams import NgramCollector
    from pipeline.data.sources import ReadStats, read_documents
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.recipe.load import load_recipe

    recipe = load_recipe(recipe_path)
    src, tok = recipe.stages[0].sources[0], load_tokenizer(recipe.tokenizer)
    t = time.perf_counter()
    texts = list(read_documents(src, ReadStats()))
    out = {"documents": len(texts), "read_s": time.perf_counter() - t}
    t = time.perf_counter()
    tokens = sum(len(ids) for k in range(0, len(texts), 512) for ids in tok.encode_batch(texts[k:k + 512]))
    out.update(tokens=tokens, tokenize_s=time.perf_counter() - t)
    t = time.perf_counter()
    ngrams = NgramCollector(13, 1, True)
    for k, text in enumerate(texts):
        ngrams.add(text, k, False)
    out["ngram_index_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for k in range(0, len(texts), 256):
        sign(texts[k:k + 256], 5, 128)
    out["dedup_signatures_s"] = time.perf_counter() - t
    return out


def timed(args: list[str], tasks: int = 1) -> float:
    """Wall seconds of `strata ARGS`, as `tasks` concurrent array tasks when tasks > 1."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    extra = [[]] if tasks == 1 else [["--shard-index", str(i), "--num-shards", str(tasks)] for i in range(tasks)]
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", *args, *e], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL) for e in extra]
    if any(p.wait() for p in procs):
        raise SystemExit(f"strata {' '.join(args)} failed")
    return round(time.perf_counter() - start, 2)


def prepare_rows(root: Path, files: int = 8, docs: int = 400) -> dict:
    """strata prepare on `files` files: one process, --workers 2, an array of 2 tasks; and the phases."""
    folder = corpus(root, files, docs)
    text = (f"name: prep\ntokenizer: {REPO / 'tokenizers' / 'demo.model'}\nseq_len: 256\n"
            "model: {init: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}}\n"
            "batch: {micro: 1, global: 8}\ndata: {dir: DIR, heldout: 0.01}\nstages:\n"
            f"  - {{name: s, schedule: {{max_lr: 1.0e-4}}, sources: [{{name: web, path: {folder}}}]}}\n")
    out = {"input_mb": round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 2), "files": files}
    for label, data, args, tasks in (("one_process", "d1", [], 1), ("workers_2", "d2", ["--workers", "2"], 1),
                                     ("array_2_tasks", "d3", [], 2)):
        recipe = root / f"{data}.yaml"
        recipe.write_text(text.replace("DIR", str(root / data)))
        out[f"{label}_s"] = timed(["prepare", str(recipe), "--quiet", *args], tasks)
        print(label, out[f"{label}_s"], flush=True)
    out["phases_one_process"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in phases(recipe).items()}
    print(json.dumps(out), flush=True)
    return out


def machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
