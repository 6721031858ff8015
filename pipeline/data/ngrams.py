"""Decontamination data: one hashed word n-gram index per source, made while it is tokenized.

Invariant: an evaluated item (a held-out document, a document of an `eval:` set, an lm-eval task
item) is contaminated at stage S when one of its `data.decontamination.ngram`-word n-grams (13 by
default, as GPT-3 and lm-eval's decontamination use) occurs in a training document of a source
learned up to S (pretraining:, then every stage's own sources up to S). Words are those of
deduplication (dedup.words: NFKC, case-folded). Each n-gram is a 64-bit hash of its words' hashes.

Each prepared source folder holds `ngram-index.npy` and `ngrams.npz`:

    index      (ngram-index.npy, read memory-mapped) sorted unique uint64: n-gram hashes of the training documents (training sources only),
               only those with hash % sample == 0 when data.decontamination.sample > 1
    queries    uint64: every n-gram hash of each evaluated document (the held-out documents of a
               training source, every document of an eval set), with
    query_doc  int64: the document each query hash belongs to, and
    documents  the number of evaluated documents (some may have no n-gram: shorter than n words)

Size: 8 bytes per distinct sampled n-gram, about one per word: ~6 GB per billion tokens (0.75
words per token) at sample 1, ~100 MB at sample 64 (docs/data-hygiene.md). Queries are small (the
held-out share). An array task writes the same arrays per part with document indices, merged and
filtered (duplicates left out) at finalize.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.dedup import training_sources, words
from pipeline.recipe.spec import Recipe, Source

NGRAMS = "ngrams.npz"
RAW = "ngrams-raw.npz"
INDEX = "ngram-index.npy"
_PRIME = np.uint64(1099511628211)
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """The hashes of every n-word n-gram of `text` (empty when it has fewer than n words)."""
    w = np.fromiter((zlib.crc32(x.encode()) for x in words(text)), dtype=np.uint64)
    if len(w) < n:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros(len(w) - n + 1, dtype=np.uint64)
        for k in range(n):
            h = h * _PRIME + w[k:len(w) - n + 1 + k]
        h ^= h >> np.uint64(33)  # splitmix-style finaliser: low bits uniform, so `% sample` samples fairly
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return h & _MASK


@dataclass
class NgramCollector:
    """N-grams of the documents of one folder being tokenized (a source, or a part of one)."""

    n: int
    sample: int
    indexed: bool  # a training source: index its training documents; else every document is evaluated
    index: list[np.ndarray] = field(default_factory=list)
    index_doc: list[np.ndarray] = field(default_factory=list)
    queries: list[np.ndarray] = field(default_factory=list)
    query_doc: list[np.ndarray] = field(default_factory=list)

    def add(self, text: str, doc: int, heldout: bool) -> None:
        h = ngram_hashes(text, self.n)
        if self.indexed and not heldout:
            kept = np.unique(h[h % np.uint64(self.sample) == 0]) if self.sample > 1 else np.unique(h)
            self.index.append(kept)
            self.index_doc.append(np.full(len(kept), doc, dtype=np.int64))
        else:
            self.queries.append(h)
            self.query_doc.append(np.full(len(h), doc, dtype=np.int64))

    def save(self, folder: Path, name: str = RAW) -> None:
        """The raw arrays, with document indices (pipeline/data/parts.py filters and merges them)."""
        cat = _concat
        np.savez(folder / name, index=cat(self.index, np.uint64), index_doc=cat(self.index_doc, np.int64),
                 queries=cat(self.queries, np.uint64), query_doc=cat(self.query_doc, np.int64))


def collector(recipe: Recipe, source: Source) -> NgramCollector:
    d = recipe.data.decontamination
    return NgramCollector(d.ngram, d.sample, any(s.name == source.name for s, _ in training_sources(recipe)))


def evaluated_documents(manifest: dict, indexed: bool) -> int:
    """How many documents of a prepared source are evaluated: the held-out ones, or all of an eval set."""
    return manifest["heldout"]["documents"] + (0 if indexed else manifest["documents"])


def _concat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)


def write_index(folder: Path, raws: list[tuple[Path, set[int]]], documents: int) -> dict:
    """Merge raw files (each with the document indices to leave out) into folder/ngrams.npz; its
    manifest entry. Document ids of part k become k << 32 | index."""
    index, queries, query_doc = [], [], []
    for k, (raw, dropped) in enumerate(raws):
        with np.load(raw) as z:
            keep = ~np.isin(z["index_doc"], list(dropped)) if dropped else slice(None)
            index.append(z["index"][keep])
            keep = ~np.isin(z["query_doc"], list(dropped)) if dropped else slice(None)
            queries.append(z["queries"][keep])
            query_doc.append(z["query_doc"][keep] + (k << 32))
    merged = np.unique(_concat(index, np.uint64))
    np.save(folder / INDEX, merged)
    np.savez(folder / NGRAMS, queries=_concat(queries, np.uint64), query_doc=_concat(query_doc, np.int64),
             documents=np.int64(documents))
    return {"files": [INDEX, NGRAMS], "index_ngrams": int(len(merged)), "index_bytes": (folder / INDEX).stat().st_size,
            "query_bytes": (folder / NGRAMS).stat().st_size}


@dataclass
class SourceNgrams:
    index: np.ndarray  # memory-mapped: a query reads the pages its binary searches touch
    queries: np.ndarray
    query_doc: np.ndarray
    documents: int

    @classmethod
    def read(cls, folder: Path) -> SourceNgrams | None:
        if not (folder / NGRAMS).is_file() or not (folder / INDEX).is_file():
            return None
        with np.load(folder / NGRAMS) as z:
            return cls(np.load(folder / INDEX, mmap_mode="r"), z["queries"], z["query_doc"], int(z["documents"]))


def contaminated_docs(queries: np.ndarray, query_doc: np.ndarray, index: np.ndarray, sample: int) -> np.ndarray:
    """The documents (ids of query_doc) with an n-gram in the sorted `index` (queries sampled as the
    index was): one binary search per query, so the index is never read whole."""
    if sample > 1:
        keep = queries % np.uint64(sample) == 0
        queries, query_doc = queries[keep], query_doc[keep]
    if not len(index) or not len(queries):
        return np.zeros(0, dtype=np.int64)
    at = np.minimum(np.searchsorted(index, queries), len(index) - 1)
    return np.unique(query_doc[index[at] == queries])
