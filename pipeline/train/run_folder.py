"""The run folder's manifest: run.json (stage status and recipe hashes) and recipe.yaml.

run.json is a record for people and scripts; the checkpoint pointer (checkpoints/latest.json)
is what decides where training resumes. Both are written atomically by rank 0. The hash of each
stage's recipe section is what lets a resumed run refuse a silently changed finished stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import ResumeError, StrataError
from pipeline.files import (
    file_sha256,
    inside,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.recipe.resolved import RESOLVED_RECIPE, resolved_raw
from pipeline.recipe.spec import Recipe
from pipeline.train.checkpoint import Pointer

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"


@dataclass
class StageRecord:
    name: str
    stage_hash: str
    status: str = "pending"  # pending | running | done
    steps: int | None = None
    final_loss: float | None = None
    checkpoint: str | None = None
    export: str | None = None
    # sha256 of every file under stages/NN-NAME/ (hf, hf-unmerged, adapter, anchor) as the stage
    # left them, by path relative to the run folder; checked whenever one is read (`stage_folder`)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class RunManifest:
    recipe: str
    world_size: int
    versions: dict = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    """stages/NN-NAME of the run folder (refused if a name would take it elsewhere)."""
    return inside(run_dir, run_dir / "stages" / f"{index + 1:02d}-{name}")


def export_dir(run_dir: Path, index: int, name: str) -> Path:
    """The Hugging Face export of stage `index` (stages/NN-NAME/hf)."""
    return stage_dir(Path(run_dir), index, name) / "hf"


def stage_checksums(run_dir: Path, index: int, name: str) -> dict[str, str]:
    """sha256 of every file of stages/NN-NAME/, by path relative to the run folder (rank 0, at the stage end)."""
    run_dir = Path(run_dir)
    folder = stage_dir(run_dir, index, name)
    return {str(p.relative_to(run_dir)): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def stage_folder(run_dir: Path, index: int, name: str, folder: str = "hf") -> Path:
    """stages/NN-NAME/FOLDER (hf, hf-unmerged, adapter) of a finished stage, after checking each file
    of it against the checksum run.json recorded when the stage finished (nothing to check in a run
    from before checksums). A changed, truncated or missing file is one error naming it."""
    run_dir = Path(run_dir)
    path = stage_dir(run_dir, index, name) / folder
    manifest = read_manifest(run_dir)
    record = manifest.stages[index] if manifest and index < len(manifest.stages) else None
    if record is None or record.name != name:
        return path
    prefix = str(path.relative_to(run_dir)) + "/"
    for rel, digest in sorted(record.files.items()):
        if not rel.startswith(prefix):
            continue
        file = run_dir / rel
        problem = "is missing" if not file.is_file() else (
            "differs from its checksum in run.json" if file_sha256(file) != digest else None)
        if problem:
            raise StrataError(f"{file}: {problem} (not as stage {name!r} wrote it: truncated, changed or deleted "
                              f"since); restore it, or train the stage again in a new --run-dir").on_every_rank()
    return path


def step_offsets(stage_steps: list[int | None]) -> list[int]:
    """The global step at which each stage starts (the steps of the stages before it), then the
    total: what TensorBoard, W&B and the report's plots put on their x axis."""
    offsets = [0]
    for steps in stage_steps:
        offsets.append(offsets[-1] + (steps or 0))
    return offsets


def read_manifest(run_dir: Path) -> RunManifest | None:
    path = run_dir / RUN_JSON
    raw = read_json(path, "run manifest", error=ResumeError)
    if raw is None:
        return None
    try:
        raw["stages"] = [StageRecord(**s) for s in raw.get("stages", [])]
        return RunManifest(**raw)
    except (TypeError, AttributeError) as e:
        raise ResumeError(f"{path}: unreadable run manifest ({e})") from None


def check_resumable(run_dir: Path, recipe: Recipe, pointer: Pointer | None) -> None:
    """Refuse a run folder whose finished (or interrupted) stages no longer match the recipe.

    A stage counts as started when run.json says so or the checkpoint pointer has reached it;
    the pointer wins when run.json lags behind (a crash between the two writes).
    """
    manifest = read_manifest(run_dir)
    records = manifest.stages if manifest else []
    reached = -1 if pointer is None else pointer.stage
    for i, rec in enumerate(records):
        started = rec.status in ("running", "done") or i <= reached
        if not started:
            continue
        where = f"{run_dir / RUN_JSON}: stage {i + 1} {rec.name!r}"
        state = "finished" if rec.status == "done" or (pointer and (i < reached or pointer.stage_done)) else "started"
        if i >= len(recipe.stages) or recipe.stages[i].name != rec.name:
            now = recipe.stages[i].name if i < len(recipe.stages) else "nothing"
            raise ResumeError(f"{where} was {state} in this run, but the recipe now has {now!r} there; "
                              "restore the recipe or use a new --run-dir")
        if recipe.stage_hash(i) != rec.stage_hash:
            raise ResumeError(f"{where} was {state} with a different recipe section (hash {rec.stage_hash}, "
                              f"now {recipe.stage_hash(i)}); restore it or use a new --run-dir")


def versions() -> dict:
    import deepspeed
    import torch
    import transformers

    import pipeline

    return {"strata": pipeline.__version__, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}


def open_run(run_dir: Path, recipe: Recipe, world_size: int) -> RunManifest:
    """Create or update the manifest for this recipe (rank 0 only). Keeps finished stages' records."""
    run_dir.mkdir(parents=True, exist_ok=True)
    old = read_manifest(run_dir)
    by_name = {r.name: r for r in old.stages} if old else {}
    records = []
    for i, stage in enumerate(recipe.stages):
        rec = by_name.get(stage.name) or StageRecord(stage.name, recipe.stage_hash(i))
        if rec.status != "done":
            rec.stage_hash = recipe.stage_hash(i)
        records.append(rec)
    manifest = RunManifest(recipe.name, world_size, versions(), records)
    save_manifest(run_dir, manifest)
    if recipe.file and Path(recipe.file).is_file():
        write_bytes_atomic(run_dir / "recipe.yaml", Path(recipe.file).read_bytes())
    else:
        write_text_atomic(run_dir / "recipe.yaml", yaml.safe_dump(recipe.raw, sort_keys=False))
    # Paths as they resolve from where the run started, so that the folder can be used from anywhere.
    write_text_atomic(run_dir / RESOLVED_RECIPE, f"# {recipe.file or 'the recipe'} with its paths resolved when the "
                      f"run started\n" + yaml.safe_dump(resolved_raw(recipe), sort_keys=False))
    return manifest


def save_manifest(run_dir: Path, manifest: RunManifest) -> None:
    write_json_atomic(run_dir / RUN_JSON, asdict(manifest))


@dataclass
class MetricsLog:
    """metrics.jsonl as read: its rows, and the number of a torn last line that was skipped."""

    rows: list[dict]
    torn_line: int | None = None

    def note(self, path: Path) -> str | None:
        if self.torn_line is None:
            return None
        return (f"{path}:{self.torn_line}: skipped a torn last line (the run was killed while writing it; "
                "its step is re-run and logged again on resume)")


def read_metrics(run_dir: Path) -> MetricsLog:
    """The one reader of metrics.jsonl (the trainer on resume, the report). A kill can tear the
    last line only, so only the last line may be torn; any other bad line is an error."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return MetricsLog([])
    lines = path.read_text(errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    log = MetricsLog([])
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            log.rows.append(row)
        elif n == last:
            log.torn_line = n
        else:
            raise StrataError(f"{path}:{n}: not a JSON line (only the last line can be torn by a kill)")
    return log
