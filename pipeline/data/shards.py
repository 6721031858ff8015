"""Shards: tokenized sources as zstd-compressed Arrow IPC files, with a manifest per source.

Layout under the recipe's data folder:

    DATA_DIR/<source>/manifest.json         counts, skipped records, checksums, tokenizer hash
    DATA_DIR/<source>/train-00000.arrow     one row per document: `tokens` (list<uint16|uint32>)
    DATA_DIR/<source>/heldout-00000.arrow   the held-out documents (by document hash), for evaluation

A source prepared with a tokenizer other than the recipe's (a stage's `tokenizer:`) lives in
DATA_DIR/<source>@<first 8 hex of the tokenizer's content hash>/, so the same source can be
prepared once per tokenizer; the recipe's own tokenizer keeps DATA_DIR/<source>/.

The manifest is written last and only once every shard is on disk, so its presence means the
source is complete. Every file is written to a temporary name and renamed. A source is prepared
again only when its inputs (file sizes and times), its recipe section or the tokenizer changed.
Reading a shard checks its SHA-256 against the manifest, so a flipped byte or a truncated file is
reported by name instead of feeding garbage to the trainer.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data.dedup import hash64, is_heldout_hash, source_spec
from pipeline.data.ngrams import RAW, NgramCollector, collector, evaluated_documents, write_index
from pipeline.data.sources import ReadStats, input_files, read_documents
from pipeline.data.tokenizer import Tokenizer, cached_tokenizer, load_tokenizer
from pipeline.errors import DataError
from pipeline.files import inside, read_json, short_hash, write_bytes_atomic
from pipeline.recipe.generated import generated_source
from pipeline.recipe.spec import Recipe, Source

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
BATCH_DOCS = 512  # documents per tokenizer call (and per worker task)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def is_heldout(text: str, fraction: float) -> bool:
    """Deterministic split by document content: the same document is held out in every run."""
    return fraction > 0 and is_heldout_hash(hash64(text.encode("utf-8", "replace")), fraction)


# --------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Accumulates tokenized documents and writes a shard every `shard_tokens` tokens."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        lengths = np.fromiter((len(a) for a in self.pending), dtype=np.int64, count=len(self.pending))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = pa.array(np.concatenate(self.pending), type=pa.from_numpy_dtype(self.dtype))
        tokens = pa.LargeListArray.from_arrays(pa.array(offsets), values)
        table = pa.table({"tokens": tokens})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
            w.write_table(table, max_chunksize=8192)
        data = sink.getvalue().to_pybytes()
        name = f"{self.prefix}-{len(self.shards):05d}.arrow"
        write_bytes_atomic(self.folder / name, data)
        self.shards.append({"file": name, "documents": len(lengths), "tokens": int(offsets[-1]),
                            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        self.pending, self.pending_tokens = [], 0

    def totals(self) -> tuple[int, int]:
        return sum(s["documents"] for s in self.shards), sum(s["tokens"] for s in self.shards)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_flat(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a batch as one flat array plus lengths: far cheaper to send between processes
    than lists of Python ints."""
    ids = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=token_dtype(tokenizer.vocab_size), count=int(lengths.sum()))
    return flat, lengths


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None
    return _encode_flat(_worker_tokenizer, texts)


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def source_folder(recipe: Recipe, name: str, tokenizer: str | Tokenizer | None = None) -> Path:
    """Where source `name` is prepared with `tokenizer` (a path or a loaded one; None: the recipe's)."""
    if tokenizer is None or tokenizer == recipe.tokenizer:
        return inside(recipe.data_dir, recipe.data_dir / name)
    digest = (cached_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer).content_hash
    if digest == cached_tokenizer(recipe.tokenizer).content_hash:
        return inside(recipe.data_dir, recipe.data_dir / name)
    return inside(recipe.data_dir, recipe.data_dir / f"{name}@{digest[:8]}")


def source_tokenizers(recipe: Recipe) -> dict[str, list[str]]:
    """The tokenizers each source is prepared with: every tokenizer of the recipe.

    A stage trains and replays with the tokenizer in force at that stage, and every domain is
    evaluated after every stage with that stage's tokenizer (and the initial model with the
    recipe's), so each source is needed under each of them.
    """
    tokenizers = recipe.tokenizers()
    return {src.name: list(tokenizers) for src in recipe.all_sources()}


def source_key(source: Source, recipe: Recipe, tokenizer: Tokenizer) -> str:
    """Everything that decides a source's shards: inputs, its recipe section, tokenizer, split."""
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in input_files(Path(source.path))]
    spec = {"schema": SCHEMA_VERSION, "files": files, "text_field": source.text_field, "split": source.split,
            "on_error": source.on_error,
            "date_field": source.date_field, "from": str(source.from_), "to": str(source.to),
            "tokenizer": tokenizer.content_hash, "shard_tokens": recipe.data.shard_tokens,
            "heldout": recipe.data.heldout}
    if source.template is not None or source.format is not None:  # absent otherwise: older keys stay valid
        spec.update(template=source.template, format=source.format)
    spec["decontamination"] = [recipe.data.decontamination.ngram, recipe.data.decontamination.sample]
    if source_spec(recipe, source.name) is not None:
        spec["dedup"] = source_spec(recipe, source.name)
    return short_hash(spec, sort_keys=True)


@dataclass
class PrepareResult:
    source: str
    skipped_up_to_date: bool
    documents: int
    tokens: int
    skipped_records: int
    summary: str


def up_to_date(source: Source, recipe: Recipe, tokenizer: Tokenizer) -> dict | None:
    """The manifest of a source whose shards are complete and current, else None."""
    folder = source_folder(recipe, source.name, tokenizer)
    try:
        existing = read_source_manifest(folder)
    except DataError:  # unreadable or from an older Strata: prepare the source again
        return None
    if existing is not None and existing.get("key") == source_key(source, recipe, tokenizer) \
            and _files_present(folder, existing):
        return existing
    return None


def prepare_source(source: Source, recipe: Recipe, tokenizer: Tokenizer, workers: int = 1,
                   progress: bool = True) -> PrepareResult:
    """Tokenize one source into shards (or do nothing when they are up to date)."""
    out = source_folder(recipe, source.name, tokenizer)
    existing = up_to_date(source, recipe, tokenizer)
    if existing is not None:
        return PrepareResult(source.name, True, existing["documents"], existing["tokens"],
                             existing["skipped_total"], "up to date")

    # Leftovers of a killed prepare of this source (one task prepares a source, so they are stale).
    # Only `.tmp-NAME-PID`: the folders of a source named `NAME-2` belong to another task.
    for prefix in (f".tmp-{out.name}-", f".old-{out.name}-"):
        for stale in recipe.data_dir.glob(f"{prefix}*"):
            if stale.name[len(prefix):].isdigit():
                shutil.rmtree(stale, ignore_errors=True)
    tmp = recipe.data_dir / f".tmp-{out.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    stats = ReadStats()
    try:
        ngrams = collector(recipe, source)
        how = Tokenizing(recipe, tokenizer, workers, sum(p.stat().st_size for p in input_files(Path(source.path))),
                         f"prepare {source.name}" if progress else None)
        counts = tokenize_documents(read_documents(source, stats), stats, tmp, how, ngrams)
        manifest = source_manifest_doc(source, recipe, tokenizer, counts)
        manifest["ngrams"] = write_index(tmp, [(tmp / RAW, set())], evaluated_documents(manifest, ngrams.indexed))
        (tmp / RAW).unlink()
    except OSError as e:  # a full disk, a read-only data dir: name the source and where it was written
        shutil.rmtree(tmp, ignore_errors=True)
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise DataError(f"{e.filename or tmp}: source {source.name!r}: cannot prepare ({e.strerror or e})"
                        + ("; free disk space and run strata prepare again" if full else "")) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install_source(tmp, out, manifest, recipe)
    return PrepareResult(source.name, False, manifest["documents"], manifest["tokens"], stats.skipped_total,
                         stats.summary())


@dataclass
class Counts:
    """What tokenizing some documents gave: the shards of each split and the read counts."""

    shards: list[dict]
    heldout: list[dict]
    stats: ReadStats
    empty: int
    rows: dict[str, list[int]] = field(default_factory=dict)  # split -> index of each row's document in the input


@dataclass(frozen=True)
class Tokenizing:
    """How one source (or one part of it) is tokenized: with which recipe's data settings and
    tokenizer, in how many worker processes, and the progress bar over its `total_bytes` of input
    (labelled `desc`; None: no bar)."""

    recipe: Recipe
    tokenizer: Tokenizer
    workers: int = 1
    total_bytes: int = 0
    desc: str | None = None


def tokenize_documents(docs: Iterator[str], stats: ReadStats, folder: Path, how: Tokenizing,
                       ngrams: NgramCollector) -> Counts:
    """Tokenize `docs` into train/held-out shards in `folder` (held out by document hash), and their
    n-grams into folder/ngrams-raw.npz (pipeline/data/ngrams.py)."""
    from pipeline.data.progress import progress_bar  # tqdm on a terminal, plain lines with ETA elsewhere

    tokenizer, workers, shard_tokens = how.tokenizer, how.workers, how.recipe.data.shard_tokens
    dtype = token_dtype(tokenizer.vocab_size)
    train = ShardWriter(folder, "train", dtype, shard_tokens)
    heldout = ShardWriter(folder, "heldout", dtype, shard_tokens)
    empty, index, rows = 0, -1, {"train": [], "heldout": []}
    bar = progress_bar(how.total_bytes, how.desc or "", "B", disable=how.desc is None, leave=False)
    pool = mp.get_context("fork").Pool(workers, _init_worker, (str(tokenizer.path),)) if workers > 1 else None
    try:
        for texts, (flat, lengths) in _encoded(_batches(docs, BATCH_DOCS), pool, tokenizer, 2 * workers):
            ends = np.cumsum(lengths)
            for text, end, length in zip(texts, ends.tolist(), lengths.tolist()):
                index += 1
                if not length:
                    empty += 1
                    continue
                split = "heldout" if is_heldout(text, how.recipe.data.heldout) else "train"
                (heldout if split == "heldout" else train).add(flat[end - length:end])
                rows[split].append(index)
                ngrams.add(text, index, split == "heldout")
            bar.update(stats.bytes_read - bar.n)
        train.flush()
        heldout.flush()
        ngrams.save(folder)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return Counts(train.shards, heldout.shards, stats, empty, rows)


def source_manifest_doc(source: Source, recipe: Recipe, tokenizer: Tokenizer, counts: Counts) -> dict:
    """The manifest of a source's shards (raises DataError when no document is left)."""
    stats = counts.stats
    documents, tokens = sum(s["documents"] for s in counts.shards), sum(s["tokens"] for s in counts.shards)
    if documents == 0:
        detail = f"; {stats.summary()}" if stats.skipped_total else ""
        raise DataError(f"{source.path}: source {source.name!r} has no documents after filtering "
                        f"({stats.out_of_range} outside the date range, {stats.skipped_total} skipped){detail}")
    manifest = {
        "schema_version": SCHEMA_VERSION, "source": source.name, "key": source_key(source, recipe, tokenizer),
        "path": source.path,
        "tokenizer": {"hash": tokenizer.content_hash, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "dtype": token_dtype(tokenizer.vocab_size).name, "documents": documents, "tokens": tokens,
        "shards": counts.shards,
        "heldout": {"documents": sum(s["documents"] for s in counts.heldout),
                    "tokens": sum(s["tokens"] for s in counts.heldout), "shards": counts.heldout},
        "out_of_range": stats.out_of_range, "empty": counts.empty,
        "skipped_total": stats.skipped_total, "skipped": stats.skipped,
    }
    manifest["fingerprint"] = fingerprint(manifest)
    return manifest


def install_source(tmp: Path, out: Path, manifest: dict, recipe: Recipe) -> None:
    """Write the manifest into the finished folder `tmp` and put it in place of `out`."""
    for shard in manifest["shards"] + manifest["heldout"]["shards"]:
        shard["mtime_ns"] = (tmp / shard["file"]).stat().st_mtime_ns  # a rewritten shard is noticed
    write_bytes_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    old = recipe.data_dir / f".old-{out.name}-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _encoded(batches: Iterator[list[str]], pool, tokenizer: Tokenizer,
             window: int) -> Iterator[tuple[list[str], tuple[np.ndarray, np.ndarray]]]:
    """(texts, token ids) per batch, in input order. With a pool, a bounded window of batches is in
    flight (Pool.imap would read the whole source into memory ahead of the workers)."""
    if pool is None:
        for texts in batches:
            yield texts, _encode_flat(tokenizer, texts)
        return
    in_flight: collections.deque = collections.deque()
    for texts in batches:
        in_flight.append((texts, pool.apply_async(_encode, (texts,))))
        if len(in_flight) >= window:
            done_texts, result = in_flight.popleft()
            yield done_texts, result.get()
    while in_flight:
        done_texts, result = in_flight.popleft()
        yield done_texts, result.get()


def _files_present(folder: Path, manifest: dict) -> bool:
    shards = manifest["shards"] + manifest["heldout"]["shards"]
    def intact(shard: dict) -> bool:
        path = folder / shard["file"]
        if not path.is_file():
            return False
        stat = path.stat()
        return stat.st_size == shard["bytes"] and stat.st_mtime_ns == shard.get("mtime_ns")

    return all(intact(s) for s in shards)


def fingerprint(manifest: dict) -> str:
    """Identity of a source's training data: the tokenizer and every shard's checksum."""
    return short_hash([manifest["tokenizer"]["hash"], manifest["dtype"], [s["sha256"] for s in manifest["shards"]]])


# --------------------------------------------------------------------------------------------
# Reading


def read_source_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    manifest = read_json(path, "shard manifest", "run strata prepare again", error=DataError)
    if manifest is None:
        return None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: shard schema version {manifest.get('schema_version')} is not "
                        f"{SCHEMA_VERSION}; run strata prepare again")
    return manifest


def source_manifest(recipe: Recipe, name: str, tokenizer: str | None = None) -> dict:
    return PreparedSource.read(recipe, name, tokenizer).manifest


def own_tokenizer(recipe: Recipe, name: str) -> str:
    """The tokenizer a source is trained with as its stage's own source (the recipe's for eval sets)."""
    return own_tokenizers(recipe).get(name, recipe.tokenizer)


def own_tokenizers(recipe: Recipe) -> dict[str, str]:
    """own_tokenizer of every stage source, in one pass (a call per source would be quadratic)."""
    return {src.name: recipe.tokenizer_at(i) for i, stage in enumerate(recipe.stages) for src in stage.sources}


def prepared_manifests(recipe: Recipe, stage: int | None = None) -> dict[str, dict]:
    """Manifests of the prepared sources (sources not yet prepared are absent): each under the
    tokenizer in force at `stage`, or by default under its own stage's tokenizer."""
    out = {}
    own = own_tokenizers(recipe)
    for src in recipe.all_sources():
        tok = recipe.tokenizer_at(stage) if stage is not None else own.get(src.name, recipe.tokenizer)
        manifest = read_source_manifest(source_folder(recipe, src.name, tok))
        if manifest is not None:
            out[src.name] = manifest
    return out


MIN_HELDOUT_DOCUMENTS = 20  # fewer, and a domain's held-out loss moves with which documents they are


def small_heldout_sets(recipe: Recipe, manifests: dict[str, dict]) -> list[str]:
    """A warning per prepared source whose held-out set has fewer than MIN_HELDOUT_DOCUMENTS documents."""
    if recipe.data.heldout <= 0:
        return []  # no held-out sets asked for
    return [f"source {name!r}: its held-out set has {m['heldout']['documents']:,} document(s), fewer than "
            f"{MIN_HELDOUT_DOCUMENTS}: its held-out loss measures those few documents (raise data.heldout, "
            f"now {recipe.data.heldout:g}, or give the source more documents)"
            for name, m in sorted(manifests.items()) if m["heldout"]["documents"] < MIN_HELDOUT_DOCUMENTS]


def prepared_tokens(recipe: Recipe, stage: int | None = None) -> dict[str, int]:
    """Training tokens per prepared source (sources not yet prepared are absent); see prepared_manifests."""
    return {name: m["tokens"] for name, m in prepared_manifests(recipe, stage).items()}


@lru_cache(maxsize=8)
def load_shard(path: str, sha256: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat token values, document offsets) of a shard, checked against its manifest checksum."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: shard missing; run strata prepare again") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{p}: corrupt shard (checksum mismatch, {len(data)} bytes); run strata prepare again")
    try:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        column = table.column("tokens").combine_chunks()
    except (pa.ArrowInvalid, KeyError) as e:
        raise DataError(f"{p}: unreadable shard ({e})") from None
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy()
    return values, offsets - offsets[0]


@dataclass(frozen=True)
class PreparedSource:
    """One source's shards under one tokenizer, from its manifest read once.

    A stage's stream reads each of its sources' manifests once, into one of these, and hands it
    to whatever needs the shards (its windows, its DataLoader workers, the resume checks).
    """

    name: str
    folder: Path
    manifest: dict

    @classmethod
    def find(cls, recipe: Recipe, name: str, tokenizer: str | None = None) -> PreparedSource | None:
        """Source `name` prepared with `tokenizer` (None: the recipe's), or None if it is not."""
        folder = source_folder(recipe, name, tokenizer)
        manifest = read_source_manifest(folder)
        return None if manifest is None else cls(name, folder, manifest)

    @classmethod
    def read(cls, recipe: Recipe, name: str, tokenizer: str | None = None) -> PreparedSource:
        """`find`, and an error naming the folder if the source is not prepared."""
        prepared = cls.find(recipe, name, tokenizer)
        if prepared is None:
            stage = next((st.name for st in recipe.stages if generated_source(st.name) == name), None)
            fix = f"strata generate {recipe.file} --stage {stage}" if stage else f"strata prepare {recipe.file}"
            raise DataError(f"{source_folder(recipe, name, tokenizer)}: source {name!r} is not prepared; run `{fix}`")
        return prepared

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def epoch_tokens(self) -> int:
        """Tokens of one pass over the training documents, each followed by one EOS."""
        return self.manifest["tokens"] + self.manifest["documents"]

    def shards(self, split: str = "train") -> list[tuple[str, dict]]:
        """(path, manifest entry) of each shard of `split` ("train" or "heldout")."""
        shards = self.manifest["shards"] if split == "train" else self.manifest["heldout"]["shards"]
        base = str(self.folder)  # string joins: a pathlib join per shard costs seconds at 10^5 shards
        return [(f"{base}/{s['file']}", s) for s in shards]


def shard_paths(recipe: Recipe, name: str, split: str = "train",
                tokenizer: str | None = None) -> list[tuple[str, dict]]:
    return PreparedSource.read(recipe, name, tokenizer).shards(split)
