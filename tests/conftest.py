"""Shared fixtures: small real-text corpora, the shipped demo tokenizer, and recipe builders."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
import zstandard
from forkserver import ForkServer

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data_recipes" / "demo"
TOKENIZER = REPO / "tokenizers" / "demo.model"
TORCHRUN = Path(sys.executable).parent / "torchrun"
WALL_CLOCK = ("time", "step_s", "data_s", "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu",
              "peak_memory_gb")


RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SERVER: list[ForkServer] = []


def fork_server() -> ForkServer:
    """This pytest worker's fork server (tests/forkserver.py), started at its first command."""
    if not _SERVER:
        env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS and k != "STRATA_TEST_FAULT"}
        _SERVER.append(ForkServer({**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, REPO))
    return _SERVER[0]


def pytest_sessionfinish(session, exitstatus) -> None:
    for server in _SERVER:
        server.close()


def strata(args: list, nproc: int = 1, fault: str | None = None, expect: int | str | None = 0, timeout: int = 600,
           env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `strata ARGS` in a process of its own (under torchrun when nproc > 1), the way a user does;
    on one rank, a fork of this worker's fork server (tests/forkserver.py: the libraries imported once).

    `fault` sets the STRATA_TEST_FAULT hook (pipeline/train/failures.py), e.g. "kill@1:3";
    `expect` is the exit code to assert: an int, "killed" (any failure: a SIGKILLed process gives
    -9 alone and 1 under torchrun), or None (don't check).
    """
    full = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("STRATA_TEST_FAULT", *RENDEZVOUS):
        full.pop(key, None)
    if fault:
        full["STRATA_TEST_FAULT"] = fault
    if nproc > 1:
        proc = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "pipeline",
                               *map(str, args)], env=full, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    else:
        proc = fork_server().run([str(a) for a in args], env=full, cwd=cwd, timeout=timeout)
    if expect == "killed":
        assert proc.returncode != 0, "the kill fault did not fire"
    elif expect is not None:
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def step_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields: what must be equal between two runs."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def demo_docs(name: str, limit: int | None = None) -> list[dict]:
    """Records of a shipped demo corpus file (real text), e.g. demo_docs('en', 20)."""
    with open(DEMO / f"{name}.jsonl.zst", "rb") as f:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        out = []
        for line in text:
            out.append(json.loads(line))
            if limit is not None and len(out) >= limit:
                break
    return out


def write_jsonl(path: Path, records: list, compress: bool = False) -> Path:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    if compress:
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def small_corpus(tmp: Path, name: str, docs: int, chars: int = 1500, compress: bool = True) -> Path:
    """A jsonl(.zst) of the first `docs` demo documents of `name`, each cut to `chars` characters."""
    records = [{"text": r["text"][:chars], **({"date": r["date"]} if "date" in r else {})}
               for r in demo_docs(name, docs)]
    suffix = ".jsonl.zst" if compress else ".jsonl"
    return write_jsonl(tmp / f"{name}{suffix}", records, compress)


def general_then_code(tmp: Path, steps: tuple[int, int], docs: int = 20, schedule: dict | None = None,
                      code_schedule: dict | None = None) -> list[dict]:
    """The two stages most training tests use: English prose, then Python code with 25% replay.

    Steps are of the `recipe_dict` batch (8 sequences of 64 tokens).
    """
    en, py = small_corpus(tmp, "en", docs), small_corpus(tmp, "code", docs)
    sched = schedule or {"warmup": 1, "max_lr": 3e-3, "min_lr": 3e-4, "decay": "cosine"}
    return [
        {"name": "general", "tokens": 8 * 64 * steps[0], "sources": [{"name": "en", "path": str(en)}],
         "schedule": sched},
        {"name": "code", "tokens": 8 * 64 * steps[1], "sources": [{"name": "py", "path": str(py)}],
         "replay": {"ratio": 0.25}, "schedule": code_schedule or sched},
    ]


def recipe_dict(tmp: Path, stages: list[dict], **overrides) -> dict:
    recipe = {
        "name": "t",
        "seed": 7,
        "tokenizer": str(TOKENIZER),
        "model": {"init": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}},
        "seq_len": 64,
        "batch": {"micro": 2, "global": 8},
        "data": {"dir": str(tmp / "data"), "heldout": 0.0},
        "stages": stages,
    }
    recipe.update(overrides)
    return recipe


def write_recipe(tmp: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@contextlib.contextmanager
def group_of_one() -> Iterator[None]:
    """A block that may join a process group of one in this process (`pipeline.distributed.join`
    sets RANK, WORLD_SIZE, MASTER_PORT, ... in os.environ): after it the group is left and the
    rendezvous variables are as before, so a later subprocess of the same pytest worker does not
    inherit them (it would meet a port this process still holds)."""
    from pipeline.distributed import leave

    saved = {k: os.environ.get(k) for k in RENDEZVOUS}
    try:
        yield
    finally:
        leave()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(autouse=True)
def no_leaked_rendezvous() -> Iterator[None]:
    """Every test leaves the rendezvous variables as it found them (see group_of_one)."""
    before = {k: os.environ.get(k) for k in RENDEZVOUS}
    yield
    after = {k: os.environ.get(k) for k in RENDEZVOUS}
    assert after == before, "the test left a process group's variables set: wrap it in group_of_one()"


def train_here(recipe: Path, run_dir: Path) -> str:
    """`strata train RECIPE --run-dir RUN_DIR` in this process, one rank: for the uninterrupted
    reference runs that kill-and-resume tests compare against (a fresh process spends about 8 s
    importing torch, transformers and DeepSpeed; the killed and resumed runs stay processes of
    their own). Returns what it printed."""
    from pipeline.cli import main

    out = io.StringIO()
    with group_of_one(), contextlib.redirect_stdout(out):
        code = main(["train", str(recipe), "--run-dir", str(run_dir)])
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def prepared_recipe(tmp: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    """Write the recipe and `strata prepare` it; its path."""
    from pipeline.cli import main

    path = write_recipe(tmp, recipe, name)
    assert main(["prepare", str(path), "--quiet"]) == 0
    return path


@pytest.fixture
def three_sources(tmp_path: Path) -> dict[str, Path]:
    """Three small real corpora: English prose, Python code, German."""
    return {"en": small_corpus(tmp_path, "en", 30), "py": small_corpus(tmp_path, "code", 30),
            "de": small_corpus(tmp_path, "de", 30)}


@pytest.fixture(scope="session")
def own_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved Hugging Face folder as a team brings it: Llama with GQA and tied embeddings, and its
    own byte-level BPE tokenizer in the same folder (tests/own_checkpoint.py)."""
    from own_checkpoint import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("own-checkpoint"))


def pytest_collection_modifyitems(items: list) -> None:
    """Modules with end-to-end (`slow`) tests first, each module's tests in their own order: under
    pytest-xdist (`make test`, one module per worker) the long modules start first and the short
    ones fill in at the end, so neither worker is left running a long module alone. (Ordering the
    long modules strictly longest first was slower: it runs two-rank drills on both workers at
    once, and gloo ranks waiting on each other then compete for the two cores.)"""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_modules)  # stable: the order within a module stays
