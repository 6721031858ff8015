"""One source over many nodes: the input files of a source split among the tasks of a SLURM array.

`strata prepare --shard-index I --num-shards N` (N > 1) cuts every (source, tokenizer) into one
*part* per input file (a saved HF dataset is one part) and gives task I every N-th part of the
recipe's list. A part is tokenized into its own staging folder,

    DATA_DIR/.parts-<source folder>/<source key>/00007/   train-*.arrow, heldout-*.arrow, part.json

written under a temporary name and renamed when complete, so a part folder exists only whole. A
part already there is never redone; a killed task's half-written part (`.tmp-00007-PID`) is
removed and redone when the task runs again.

Finalizing. Each task, after writing its parts of a source, looks whether every part of it is
there; the first task to see that and to create `finalize.lock` (O_CREAT | O_EXCL, atomic on a
shared file system) writes the source: it hard-links every part's shards into a new source folder
in part order, merges the counts into one manifest and puts the folder in place as a one-task
prepare does. Until then the source has no manifest and counts as not prepared. If the finalizing
task dies, `strata prepare RECIPE --finalize` finishes the job.

Deduplication (pipeline/data/dedup.py). With data.dedup, parts are tokenized whole and each
part also keeps `rows.npz` (the input index of each row's document); the finalize step leaves the
documents the plan drops out (a part with none dropped is linked, one with drops written again).
The n-grams of each part (`ngrams-raw.npz`, pipeline/data/ngrams.py) are merged the same way.

Same data whatever N. Parts are per file, documents are held out by their content hash, and
skipped records are counted per file, so the documents, tokens, skip counts and held-out split
of a source do not depend on the number of tasks. The shards do (a one-task prepare packs
documents of several files into one shard), so the fingerprint may differ.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.dedup import Removed
from pipeline.data.ngrams import RAW, collector, evaluated_documents, write_index
from pipeline.data.shards import (
    Counts,
    ShardWriter,
    Tokenizing,
    install_source,
    load_shard,
    source_folder,
    source_key,
    source_manifest_doc,
    token_dtype,
    tokenize_documents,
)
from pipeline.data.sources import ReadStats, input_files, part_inputs, read_file_documents
from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import DataError
from pipeline.files import read_json, write_bytes_atomic
from pipeline.recipe.spec import Recipe, Source

PART = "part.json"
LOCK = "finalize.lock"
ROWS = "rows.npz"  # per split, the index in the part's input of each row's document (for deduplication)


@dataclass(eq=False)  # compared by identity
class SourceParts:
    """The parts of one (source, tokenizer) and where they are staged."""

    source: Source
    recipe: Recipe
    tokenizer: Tokenizer

    def __post_init__(self) -> None:
        self.inputs = part_inputs(self.source)
        self.out = source_folder(self.recipe, self.source.name, self.tokenizer)
        self.staging = self.recipe.data_dir / f".parts-{self.out.name}"
        self.folder = self.staging / source_key(self.source, self.recipe, self.tokenizer)

    def part_dir(self, index: int) -> Path:
        return self.folder / f"{index:05d}"

    def done(self, index: int) -> bool:
        return (self.part_dir(index) / PART).is_file()

    def missing(self) -> list[int]:
        return [i for i in range(len(self.inputs)) if not self.done(i)]

    def prepare(self, index: int, workers: int = 1, progress: bool = False) -> bool:
        """Tokenize part `index` unless it is done; True when it was prepared now."""
        if self.done(index):
            return False
        for old in self.staging.glob("*"):  # parts of an older key (inputs or recipe changed)
            if old != self.folder:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.folder.glob(f".tmp-{index:05d}-*"):  # a killed task's half-written part
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.folder / f".tmp-{index:05d}-{os.getpid()}"
        tmp.mkdir(parents=True)
        file = self.inputs[index]
        stats = ReadStats()
        try:
            size = sum(p.stat().st_size for p in input_files(file))
            how = Tokenizing(self.recipe, self.tokenizer, workers, size,
                             f"prepare {self.source.name} [{index}]" if progress else None)
            counts = tokenize_documents(read_file_documents(self.source, file, stats), stats, tmp, how,
                                        collector(self.recipe, self.source))
            part = {"file": str(file), "shards": counts.shards, "heldout": counts.heldout, "empty": counts.empty,
                    "out_of_range": stats.out_of_range, "skipped": stats.skipped}
            if self.recipe.data.dedup is not None:  # the finalize step may leave documents out
                np.savez(tmp / ROWS, **{k: np.asarray(v, dtype=np.int64) for k, v in counts.rows.items()})
            write_bytes_atomic(tmp / PART, json.dumps(part, indent=1).encode())
            tmp.rename(self.part_dir(index))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True

    def try_finalize(self, force: bool = False, removed: Removed | None = None) -> dict | None:
        """Write the source's manifest if every part is there and no other task is doing it (with
        `force`, whatever a lock says: `--finalize` after a finalizing task died), leaving out the
        documents deduplication drops (`removed`). The manifest, or None."""
        if self.missing():
            return None
        if not force:
            try:
                fd = os.open(self.folder / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return None
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
            os.close(fd)
        tmp = self.recipe.data_dir / f".tmp-{self.out.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            drops = removed.drops if removed is not None else {}
            manifest = source_manifest_doc(self.source, self.recipe, self.tokenizer, self._merge(tmp, drops))
            if removed is not None:
                manifest["dedup"] = removed.summary()
            raws = [(self.part_dir(i) / RAW, set(drops.get(i, ()))) for i in range(len(self.inputs))]
            indexed = collector(self.recipe, self.source).indexed
            manifest["ngrams"] = write_index(tmp, raws, evaluated_documents(manifest, indexed))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        install_source(tmp, self.out, manifest, self.recipe)
        shutil.rmtree(self.staging, ignore_errors=True)
        return manifest

    def _merge(self, tmp: Path, drops: dict[int, list[int]]) -> Counts:
        """Link every part's shards into `tmp` (`p00007-train-00000.arrow`, in part order) and add up
        their counts; a part with documents in `drops` (part -> document indices) is written again
        without them."""
        stats, shards, heldout, empty = ReadStats(), [], [], 0
        for i in range(len(self.inputs)):
            part = read_json(self.part_dir(i) / PART, "prepared part", "delete its folder and run strata prepare "
                             "again", DataError)  # present: every part is done before the merge
            for split, into in (("shards", shards), ("heldout", heldout)):
                if drops.get(i):
                    into.extend(self._filtered(i, split, part[split], set(drops[i]), tmp))
                    continue
                for shard in part[split]:
                    name = f"p{i:05d}-{shard['file']}"
                    os.link(self.part_dir(i) / shard["file"], tmp / name)  # same file system: no copy
                    into.append({**shard, "file": name})
            empty += part["empty"]
            stats.out_of_range += part["out_of_range"]
            stats.skipped.update(part["skipped"])  # counted per file, and each file is in one part
            stats.documents += sum(s["documents"] for s in part["shards"] + part["heldout"])
        return Counts(shards, heldout, stats, empty)

    def _filtered(self, i: int, split: str, shards: list[dict], dropped: set[int], tmp: Path) -> list[dict]:
        """The shards of one split of part `i` written again into `tmp` without the `dropped` documents."""
        prefix = "train" if split == "shards" else "heldout"
        with np.load(self.part_dir(i) / ROWS) as z:
            rows = z[prefix]
        writer = ShardWriter(tmp, f"p{i:05d}-{prefix}", token_dtype(self.tokenizer.vocab_size),
                             self.recipe.data.shard_tokens)
        row = 0
        for shard in shards:
            values, offsets = load_shard(str(self.part_dir(i) / shard["file"]), shard["sha256"])
            for k in range(len(offsets) - 1):
                if int(rows[row]) not in dropped:
                    writer.add(values[offsets[k]:offsets[k + 1]])
                row += 1
        writer.flush()
        return writer.shards
