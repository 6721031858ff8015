"""Generative replay: the text a stage replays, written by a model before the stage trains.

`replay: {ratio, generate: {...}}` (pipeline/recipe/generated.py) makes part of a stage's replay
share text that a model generates. This module writes it as a prepared source, so the stream,
its resume checks and its DataLoader workers read it like any other:

    DATA_DIR/generated-STAGE/gen.json                what the text belongs to (see below)
    DATA_DIR/generated-STAGE/block-00007-00000.arrow the samples of block 7 (token ids, Arrow IPC, zstd)
    DATA_DIR/generated-STAGE/block-00007.json        its shard entry (checksum, counts): marks it done
    DATA_DIR/generated-STAGE/manifest.json           written last, once every block is there

Blocks. The budget `tokens` is cut into samples of at most `max_new_tokens` and the samples into
blocks of `batch`; block k is one batched, KV-cached `generate` call, sampled under a seed of
(recipe seed, stage, k). A block is therefore a pure function of the settings, the model and k:
the same seed gives the same text, and the blocks of a killed generation are kept and the rest
generated on resume, giving the shards an uninterrupted run gives. Under torchrun rank r writes
blocks r, r + world, ...; rank 0 writes the manifest after a barrier.

gen.json ties the text to the generating model (SHA-256 of its config and weights, or of the
recipe's `model:` for a fresh one), the tokenizer and the sampling settings; when any of them
changes, the folder is emptied and generated again. The manifest keeps them under `generation`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.shards import (
    MANIFEST,
    SCHEMA_VERSION,
    ShardWriter,
    fingerprint,
    read_source_manifest,
    source_folder,
    token_dtype,
)
from pipeline.data.tokenizer import Tokenizer, cached_tokenizer
from pipeline.distributed import barrier, compute_dtype, join, log
from pipeline.errors import DataError, StrataError
from pipeline.files import read_json, write_bytes_atomic, write_json_atomic
from pipeline.recipe.generated import Generate, generated_source
from pipeline.recipe.spec import Recipe
from pipeline.train.reference import frozen_model, frozen_model_path
from pipeline.train.scoring import reference_fingerprint

LOG = log(__name__)

VERSION = 1


@dataclass(frozen=True)
class GenerationJob:
    """One stage's generation: the settings, where it goes and what it needs."""

    recipe: Recipe
    index: int
    spec: Generate
    folder: Path
    tokenizer: Tokenizer
    model_path: Path | None  # None: the recipe's seeded initial model

    @classmethod
    def for_stage(cls, recipe: Recipe, index: int, run_dir: Path) -> GenerationJob:
        stage = recipe.stages[index]
        if stage.replay is None or stage.replay.generate is None:
            raise StrataError(f"{recipe.file}: stages[{index}] {stage.name!r} has no replay.generate")
        spec = stage.replay.generate
        tok = recipe.tokenizer_at(index)
        name = "init" if spec.model == "init" else spec.model
        path = (Path(recipe.model.from_pretrained) if recipe.model.from_pretrained else None) if name == "init" \
            else frozen_model_path(recipe, index, run_dir, name, "replay.generate.model")
        return cls(recipe, index, spec, source_folder(recipe, generated_source(stage.name), tok),
                   cached_tokenizer(tok), path)

    @property
    def samples(self) -> int:
        return math.ceil(self.spec.tokens / self.spec.max_new_tokens)

    @property
    def blocks(self) -> int:
        return math.ceil(self.samples / self.spec.batch)

    def meta(self) -> dict:
        """Everything that decides the text (gen.json; compared on every start)."""
        if self.model_path is not None:
            model = reference_fingerprint(self.model_path)
        else:
            blob = json.dumps([self.recipe.raw.get("model"), self.recipe.seed], sort_keys=True)
            model = {"path": None, "sha256": hashlib.sha256(blob.encode()).hexdigest()}
        return {"version": VERSION, "stage": self.recipe.stages[self.index].name, "seed": self.recipe.seed,
                "settings": dataclasses.asdict(self.spec), "prompts_sha256": self._prompts_hash(),
                "model": model, "tokenizer": self.tokenizer.content_hash}

    def _prompts_hash(self) -> str | None:
        if self.spec.prompts == "bos":
            return None
        return hashlib.sha256(Path(self.spec.prompts).read_bytes()).hexdigest()

    def block_file(self, k: int) -> Path:
        return self.folder / f"block-{k:05d}.json"

    def missing(self) -> list[int]:
        return [k for k in range(self.blocks) if not self.block_file(k).is_file()]


def prompt_ids(job: GenerationJob) -> list[list[int]]:
    """The prompts as token ids: one start token (`bos`), or the lines of the prompts file."""
    if job.spec.prompts == "bos":
        tok = job.tokenizer
        pretrained = job.recipe.model.from_pretrained is not None
        return [[tok.bos_id if pretrained and tok.bos_id >= 0 else tok.eos_id]]
    lines = [line.strip() for line in Path(job.spec.prompts).read_text(encoding="utf-8").splitlines()]
    ids = [x for x in job.tokenizer.encode_batch([line for line in lines if line]) if x]
    if not ids:
        raise StrataError(f"{job.spec.prompts}: stages[{job.index}].replay.generate.prompts has no prompt")
    return ids


@torch.no_grad()
def generate_block(job: GenerationJob, model: torch.nn.Module, prompts: list[list[int]], k: int,
                   device: torch.device) -> list[np.ndarray]:
    """The samples of block k (token ids without the start token; cut at the first EOS)."""
    spec, eos = job.spec, job.tokenizer.eos_id
    first, last = k * spec.batch, min((k + 1) * spec.batch, job.samples)
    chosen = [prompts[j % len(prompts)] for j in range(first, last)]
    width = max(len(p) for p in chosen)
    ids = torch.full((len(chosen), width), eos, dtype=torch.long)
    mask = torch.zeros((len(chosen), width), dtype=torch.long)
    for row, p in enumerate(chosen):  # left padding: every prompt ends where generation starts
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    seed = zlib.crc32(json.dumps([job.recipe.seed, job.index, k]).encode())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k or None,
                             max_new_tokens=spec.max_new_tokens, eos_token_id=eos, pad_token_id=eos,
                             use_cache=True)
    samples = []
    keep_prompt = spec.prompts != "bos"  # a real document's first words belong to the sample
    for row, p in enumerate(chosen):
        new = out[row, width:].tolist()
        new = new[:new.index(eos)] if eos in new else new
        samples.append(np.asarray((p if keep_prompt else []) + new, dtype=token_dtype(job.tokenizer.vocab_size)))
    return samples


def write_block(job: GenerationJob, k: int, samples: list[np.ndarray]) -> None:
    """Block k's shard, then its entry (which marks it done)."""
    writer = ShardWriter(job.folder, f"block-{k:05d}", token_dtype(job.tokenizer.vocab_size), 1 << 62)
    empty = 0
    for ids in samples:
        if len(ids):
            writer.add(ids)
        else:
            empty += 1
    writer.flush()
    entry = dict(writer.shards[0]) if writer.shards else None
    if entry is not None:
        entry["mtime_ns"] = (job.folder / entry["file"]).stat().st_mtime_ns
    write_json_atomic(job.block_file(k), {"shard": entry, "empty": empty})


def write_manifest(job: GenerationJob, meta: dict) -> dict:
    """The source manifest over every block, in block order (rank 0, once all are there)."""
    shards, empty = [], 0
    for k in range(job.blocks):
        block = read_json(job.block_file(k), "generated block", f"delete {job.folder} and generate again", DataError)
        empty += block["empty"]
        if block["shard"] is not None:
            shards.append(block["shard"])
    if not shards:
        raise DataError(f"{job.folder}: the generating model wrote only empty samples (EOS first) for stage "
                        f"{meta['stage']!r}; raise temperature or give prompts")
    tok = job.tokenizer
    manifest = {"schema_version": SCHEMA_VERSION, "source": generated_source(meta["stage"]), "key": meta["model"]["sha256"][:16],
                "path": str(job.model_path or "the recipe's initial model"),
                "tokenizer": {"hash": tok.content_hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
                "dtype": token_dtype(tok.vocab_size).name, "documents": sum(s["documents"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards), "shards": shards,
                "heldout": {"documents": 0, "tokens": 0, "shards": []},  # generated text is never evaluated
                "out_of_range": 0, "empty": empty, "skipped_total": 0, "skipped": {}, "generation": meta}
    manifest["fingerprint"] = fingerprint(manifest)
    write_bytes_atomic(job.folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def start(job: GenerationJob, meta: dict) -> bool:
    """Adopt `meta` (rank 0): a folder of other settings or another model is emptied. True when
    the generation is already complete."""
    old = read_json(job.folder / "gen.json", "generation meta", f"delete {job.folder}") \
        if (job.folder / "gen.json").is_file() else None
    if old == meta:
        manifest = read_source_manifest(job.folder)
        return manifest is not None and manifest.get("generation") == meta
    if job.folder.exists():
        shutil.rmtree(job.folder)
    job.folder.mkdir(parents=True)
    write_json_atomic(job.folder / "gen.json", meta)
    return False


def ensure_generated(recipe: Recipe, index: int, run_dir: Path) -> dict:
    """Generate stage `index`'s replay text (this rank's blocks; every rank calls it), unless it is
    complete. Returns the manifest; resumable after a kill."""
    group = join()
    rank, world, device = group.rank, group.world_size, group.device
    job = GenerationJob.for_stage(recipe, index, run_dir)
    meta = job.meta()
    done = start(job, meta) if rank == 0 else False
    barrier()
    todo = [k for k in job.missing() if k % world == rank]
    if job.missing():  # the logger prints rank 0's line only
        LOG.info(f"stage {index + 1}: generating replay text with {job.model_path or 'the initial model'} "
                 f"({job.spec.engine}): {len(job.missing())} of {job.blocks} block(s) of {job.spec.batch} samples "
                 f"to do on {world} rank(s)")
    if todo and job.spec.engine == "vllm":
        from pipeline.train.generation_vllm import vllm_blocks  # an optional library, imported only here

        vllm_blocks(job, todo, prompt_ids(job), write_block)
    elif todo:
        model = frozen_model(job.model_path, recipe, job.tokenizer, device, compute_dtype(recipe.train.dtype, device))
        prompts = prompt_ids(job)
        for k in todo:
            write_block(job, k, generate_block(job, model, prompts, k, device))
        del model
    barrier()
    if rank == 0 and not done:
        write_manifest(job, meta)
    barrier()
    manifest = read_source_manifest(job.folder)
    if manifest is None:
        raise DataError(f"{job.folder}: generated replay text has no manifest; run strata generate again")
    return manifest
