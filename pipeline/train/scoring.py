"""`strata score`: the reference model's per-token losses over a stage's stream, computed once.

The stream is a pure function of its global sample index, so the sequences a stage will train on
are known before training: `strata score RECIPE --stage NAME` runs the reference model over
exactly those sequences (same packing, same micro-batches) and stores the per-token losses in
float16 beside the shards:

    DATA_DIR/.scores/STAGE/meta.json           what the scores belong to (see below)
    DATA_DIR/.scores/STAGE/block-000000.npy    float16 [samples of the block, seq_len]
    DATA_DIR/.scores/STAGE/block-000000.crc.npy  uint32 CRC-32 of each sample's labels

A block holds `block_steps` optimizer steps' worth of global samples. Blocks are written
atomically (the .npy is renamed into place last), so scoring resumes block by block, and under
torchrun rank r scores blocks r, r + world, ... (any world size can continue another's work).

meta.json ties the scores to the stream (stage, seed, seq_len, global batch, the mixture, each
source's shard fingerprint and the cursors the stage starts from) and to the reference model
(SHA-256 of its config and weight files). Training refuses scores whose meta does not match, and
checks every sample's label CRC as it reads it, so scores of other data can never be used.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from pipeline.data.context import StageContext
from pipeline.data.shards import prepared_tokens
from pipeline.data.stream import StageStream
from pipeline.data.tokenizer import load_tokenizer
from pipeline.distributed import barrier, compute_dtype, join, log
from pipeline.errors import StrataError
from pipeline.files import read_json, write_bytes_atomic, write_json_atomic
from pipeline.recipe.plan import StagePlan, build_plan
from pipeline.recipe.spec import Recipe
from pipeline.train.reference import frozen_model_path, load_frozen, reference_losses

VERSION = 1
LOG = log(__name__)
TOKENS_PER_BLOCK = 1 << 24  # ~32 MB of float16 per block file


def row_crcs(labels: torch.Tensor) -> np.ndarray:
    """CRC-32 of each row of a [B, L] label tensor (its int64 bytes)."""
    arr = np.ascontiguousarray(labels.cpu().numpy().astype(np.int64, copy=False))
    return np.array([zlib.crc32(row.tobytes()) for row in arr], dtype=np.uint32)


def reference_fingerprint(path: Path) -> dict:
    """The reference model's identity: SHA-256 over its config and weight files."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir()
                   if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    for p in files:
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return {"path": str(path), "sha256": digest.hexdigest()}


def stream_fingerprint(plan: StagePlan, state: dict) -> dict:
    """What decides the stage's sequences: the stage's plan (as handed to its stream) and the
    stream's state_dict()."""
    names = sorted(state["stage_start"])
    return {
        "stage": state["stage"], "stage_index": plan.index, "seed": state["seed"], "seq_len": state["seq_len"],
        "global_batch": state["global_batch"], "steps": plan.steps,
        "mixture": [[c.source, round(c.share, 12), bool(getattr(c, "resample", False))] for c in plan.mixture],
        "fingerprints": {n: state["fingerprints"][n] for n in names},
        "stage_start": {n: state["stage_start"][n] for n in names},
    }


def carried_state(recipe: Recipe, index: int, plans: list[StagePlan] | None = None) -> dict | None:
    """The stream state stage `index` starts from (what training carries over), without reading data.
    `plans`: the recipe's plan, when the caller has built it."""
    plans = plans if plans is not None else build_plan(recipe, prepared_tokens(recipe))
    carried = None
    for j in range(index):
        stream = StageStream(recipe, j, carried=carried, plan=plans[j])
        for _ in range(stream.steps):
            stream.skip_step()
        carried = stream.state_dict()
    return carried


class ScoreStore:
    """The score files of one stage: meta, blocks, and reading rows by global sample index."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta: dict | None = None
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def for_stage(cls, recipe: Recipe, index: int) -> ScoreStore:
        return cls(recipe.data_dir / ".scores" / recipe.stages[index].name)

    def read_meta(self) -> dict | None:
        return read_json(self.folder / "meta.json", "scores meta", f"delete {self.folder} and run strata score again")

    def block(self, b: int) -> Path:
        return self.folder / f"block-{b:06d}.npy"

    def blocks(self) -> int:
        m = self.meta
        return -(-m["samples"] // m["block_samples"])

    def missing(self) -> list[int]:
        return [b for b in range(self.blocks()) if not self.block(b).is_file()]

    # -- writing (strata score) ----------------------------------------------------------------
    def start(self, meta: dict) -> bool:
        """Adopt `meta`; files of other meta are removed. Returns whether old work was discarded."""
        old = self.read_meta()
        stale = old is not None and old != meta
        if stale or old is None:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
            write_json_atomic(self.folder / "meta.json", meta)
        self.meta = meta
        return stale

    def write_block(self, b: int, losses: np.ndarray, crcs: np.ndarray) -> None:
        for path, arr in ((self.block(b).with_suffix(".crc.npy"), crcs), (self.block(b), losses)):
            buf = io.BytesIO()
            np.save(buf, arr)
            write_bytes_atomic(path, buf.getvalue())  # the losses file lands last: it marks the block done

    # -- reading (training) --------------------------------------------------------------------
    def check(self, stream: dict, reference: dict, recipe: Recipe, index: int) -> None:
        """Refuse scores that are missing, incomplete, or for another stream or reference model."""
        name = recipe.stages[index].name
        rerun = f"run `strata score {recipe.file or 'RECIPE'} --stage {name}`"
        meta = self.read_meta()
        if meta is None:
            raise StrataError(f"{self.folder}: no RHO-1 scores for stage {name!r} (selection.scoring is "
                              f"precomputed); {rerun} first")
        if meta.get("version") != VERSION:
            raise StrataError(f"{self.folder}: RHO-1 scores of format {meta.get('version')}, expected {VERSION}; {rerun}")
        if meta["reference"]["sha256"] != reference["sha256"]:
            raise StrataError(f"{self.folder}: stale RHO-1 scores: computed with another reference model "
                              f"({meta['reference']['path']}, sha256 {meta['reference']['sha256'][:12]}; now "
                              f"{reference['path']}, {reference['sha256'][:12]}); {rerun}")
        for key, want in stream.items():
            if meta["stream"].get(key) != want:
                raise StrataError(f"{self.folder}: stale RHO-1 scores: computed for another stream "
                                  f"({key} was {meta['stream'].get(key)!r}, now {want!r}); {rerun}")
        self.meta = meta
        missing = self.missing()
        if missing:
            raise StrataError(f"{self.folder}: RHO-1 scores incomplete ({len(missing)} of {self.blocks()} "
                              f"block(s) missing); {rerun} (it resumes)")

    def _rows(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._open:
            if len(self._open) >= 2:  # reading is sequential
                self._open.pop(next(iter(self._open)))
            self._open[b] = (np.load(self.block(b), mmap_mode="r"),
                             np.load(self.block(b).with_suffix(".crc.npy")))
        return self._open[b]

    def lookup(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Reference losses [B, L] (float32) of global samples `index`, checked against their labels."""
        per = self.meta["block_samples"]
        crcs = row_crcs(labels)
        out = np.empty(tuple(labels.shape), dtype=np.float16)
        for row, g in enumerate(index.tolist()):
            losses, stored = self._rows(g // per)
            if stored[g % per] != crcs[row]:
                raise StrataError(f"{self.folder}: RHO-1 scores do not match the data of sample {g} (other "
                                  "packing or changed shards); rerun `strata score`")
            out[row] = losses[g % per]
        return torch.from_numpy(out).float()


def score_stage(recipe: Recipe, stage: str, run_dir: Path, block_steps: int | None = None,
                progress: bool = True) -> ScoreStore:
    """Score stage `stage` (this rank's share of the blocks, under torchrun); resumable."""
    from pipeline.data.progress import progress_bar  # tqdm on a terminal, plain lines elsewhere

    names = [s.name for s in recipe.stages]
    if stage not in names:
        raise StrataError(f"{recipe.file}: no stage named {stage!r} (stages: {', '.join(names)})")
    index = names.index(stage)
    if recipe.stages[index].selection is None:
        raise StrataError(f"{recipe.file}: stages[{index}] {stage!r} has no selection to score for")
    group = join()
    rank, world, device = group.rank, group.world_size, group.device
    plans = build_plan(recipe, prepared_tokens(recipe))
    ctx = StageContext(recipe, index, plans[index], load_tokenizer(recipe.tokenizer_at(index)), group,
                       compute_dtype(recipe.train.dtype, device), Path(run_dir))
    path = frozen_model_path(recipe, index, run_dir, recipe.stages[index].selection.reference, "selection.reference")
    model = load_frozen(path, ctx)
    # One process's view of the stage: the micro-batches are groups of batch.micro consecutive
    # global samples, exactly as every rank of any world size groups them in training. The plan is
    # built once, as the trainer builds it, and handed to every stage's stream.
    stream = StageStream(recipe, index, carried=carried_state(recipe, index, plans), plan=plans[index])
    per_step = recipe.batch.global_
    if block_steps is None:
        block_steps = max(1, TOKENS_PER_BLOCK // (per_step * recipe.seq_len))
    meta = {"version": VERSION, "stream": stream_fingerprint(stream.plan, stream.state_dict()),
            "reference": reference_fingerprint(path), "block_samples": block_steps * per_step,
            "samples": stream.steps * per_step, "seq_len": recipe.seq_len, "dtype": "float16"}
    store = ScoreStore.for_stage(recipe, index)
    if rank == 0 and store.start(meta):
        LOG.info(f"{store.folder}: earlier scores were for another stream or reference; rescoring")
    barrier()
    store.meta = meta
    todo = [b for b in store.missing() if b % world == rank]
    LOG.info(f"scoring stage {stage!r} with {path}: {store.blocks()} block(s) of {block_steps} step(s), "
             f"{len(store.missing())} to do on {world} rank(s)")  # rank 0 speaks for all
    steps = sum(min(block_steps, stream.steps - b * block_steps) for b in todo)  # the last block is short
    bar = progress_bar(steps, f"score {stage}", "step", disable=not progress or rank != 0)
    step = 0
    for b in todo:
        while step < b * block_steps:  # other ranks' (or finished) blocks: advance without reading
            stream.skip_step()
            step += 1
        losses, crcs = [], []
        while step < min((b + 1) * block_steps, stream.steps):
            for _ in range(stream.grad_accum):
                batch = next(stream)
                losses.append(reference_losses(model, {k: v.to(device) for k, v in batch.items()}).half().cpu().numpy())
                crcs.append(row_crcs(batch["labels"]))
            step += 1
            bar.update(1)
        store.write_block(b, np.concatenate(losses), np.concatenate(crcs))
    bar.close()
    barrier()
    LOG.info(f"scores of stage {stage!r}: {store.folder} ({store.blocks()} block(s), {meta['samples']:,} sequences)")
    return store
