"""Deduplication of the training sources: signatures per part, one plan over all of them.

Invariant: which documents are dropped is a pure function of the recipe and the documents' text,
whatever the number of prepare tasks. Each input file of a training source (a *part*, as in
pipeline/data/parts.py) gets a signature file, written once by the task that owns the part:

    DATA_DIR/.dedup/<source>/<part>-<key>.npz   per document: exact hash, split hash, MinHash

`exact` hashes the normalised text (NFKC, case-folded, words only); `content` is the hash that
puts a document in the held-out split (shards.is_heldout); `minhash` is datasketch's MinHash of
the document's word n-grams (also for `method: exact`, to keep the held-out split clean). The key covers the file (size,
time), the reader's settings and the signature settings, so a changed input is signed again.

The plan (`plan_dedup`) walks every training document in recipe order (pretraining:, then each
stage's sources in order, each source's parts and documents in order) and keeps the first
occurrence: a document is an exact duplicate if an earlier kept document of its group has the same
exact hash, a near duplicate if MinHash-LSH finds an earlier kept one whose estimated Jaccard
similarity is at least the source's threshold. The group is the whole recipe (`across_stages`) or
the stage. Then every kept held-out document that has an exact or near duplicate among the kept
training documents of any source is dropped too, so the held-out loss is never flattered by a near
copy in training. The plan lives in memory: a few hundred bytes per document (see docs/data-hygiene.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.sources import ReadStats, part_inputs, read_file_documents
from pipeline.recipe.spec import Recipe, Source

WORD = re.compile(r"\w+")
BATCH = 256


# ASCII characters that are not word characters (\w), as spaces: for an ASCII text `translate` +
# `split` gives exactly WORD.findall, several times faster.
_NOT_WORD = {c: " " for c in range(128) if not chr(c).isalnum() and chr(c) != "_"}


def words(text: str) -> list[str]:
    """The words of a text as deduplication and decontamination see it (NFKC, case-folded)."""
    if text.isascii():  # NFKC and case folding of ASCII are lower()
        return text.lower().translate(_NOT_WORD).split()
    return WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def is_heldout_hash(content: int, fraction: float) -> bool:
    """Whether a document whose raw text hashes (hash64) to `content` is in the held-out split."""
    return fraction > 0 and content < fraction * 2**64


@dataclass(frozen=True)
class Rule:
    """How one training source's documents are tested, and which documents they are tested against."""

    method: str  # none | exact | minhash
    threshold: float
    group: int  # 0 for every source with across_stages, else the stage index (-1: pretraining)


def training_sources(recipe: Recipe) -> list[tuple[Source, int]]:
    """(source, stage index) in recipe order: pretraining: (-1) first, then the stages' sources."""
    return [(s, -1) for s in recipe.pretraining] + [(s, i) for i, st in enumerate(recipe.stages) for s in st.sources]


def rules(recipe: Recipe) -> dict[str, Rule]:
    """The rule of each training source (empty without data.dedup)."""
    d = recipe.data.dedup
    if d is None:
        return {}
    out = {}
    for src, stage in training_sources(recipe):
        own = src.dedup
        method = own.method if own is not None and own.method is not None else d.method
        threshold = own.threshold if own is not None and own.threshold is not None else d.threshold
        out[src.name] = Rule(method, threshold, 0 if d.across_stages else stage)
    return out


def source_spec(recipe: Recipe, name: str) -> dict | None:
    """What of data.dedup decides a source's shards (for its key), or None when it is not deduplicated."""
    rule = rules(recipe).get(name)
    if rule is None:
        return None
    d = recipe.data.dedup
    return {"method": rule.method, "threshold": rule.threshold, "ngram": d.ngram, "num_perm": d.num_perm,
            "across_stages": d.across_stages}


# --------------------------------------------------------------------------------------------
# Signatures


@dataclass
class PartSignatures:
    exact: np.ndarray  # uint64 [documents]
    content: np.ndarray  # uint64 [documents]
    minhash: np.ndarray  # uint64 [documents, num_perm]


def signature_file(recipe: Recipe, source: Source, index: int, file: Path) -> Path:
    d = recipe.data.dedup
    stat = file.stat() if file.is_file() else None
    spec = {"file": str(file), "size": stat.st_size if stat else None, "mtime": stat.st_mtime_ns if stat else None,
            "reader": [source.text_field, source.split, source.on_error, source.date_field, str(source.from_),
                       str(source.to), source.template, source.format],
            "ngram": d.ngram, "num_perm": d.num_perm}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return recipe.data_dir / ".dedup" / source.name / f"{index:05d}-{key}.npz"


def sign(texts: list[str], ngram: int, num_perm: int) -> PartSignatures:
    """Signatures of a batch of documents."""
    from datasketch import MinHash

    split = [words(t) for t in texts]
    exact = np.array([hash64(" ".join(w).encode()) for w in split], dtype=np.uint64)
    content = np.array([hash64(t.encode("utf-8", "replace")) for t in texts], dtype=np.uint64)
    shingles = [{" ".join(w[i:i + ngram]).encode() for i in range(max(1, len(w) - ngram + 1))} if w else set()
                for w in split]
    minhash = np.stack([m.hashvalues for m in MinHash.bulk(shingles, num_perm=num_perm)]).astype(np.uint64)
    return PartSignatures(exact, content, minhash)


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def sign_part(recipe: Recipe, source: Source, index: int) -> bool:
    """Write the signature file of part `index` of `source` unless it is there; True when written now."""
    file = part_inputs(source)[index]
    out = signature_file(recipe, source, index, file)
    if out.is_file():
        return False
    d = recipe.data.dedup  # MinHash also for exact-only recipes: the held-out split is kept clean of near copies
    batches = [sign(b, d.ngram, d.num_perm) for b in _batches(read_file_documents(source, file, ReadStats()))]
    empty = PartSignatures(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros((0, d.num_perm), np.uint64))
    sig = PartSignatures(*(np.concatenate([getattr(b, k) for b in batches]) for k in ("exact", "content", "minhash"))) \
        if batches else empty
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f"{index:05d}-*.npz"):  # signatures of an older version of the part
        old.unlink(missing_ok=True)
    tmp = out.parent / f".tmp-{os.getpid()}-{out.name}"
    np.savez(tmp, exact=sig.exact, content=sig.content, minhash=sig.minhash)
    tmp.rename(out)
    return True


def all_parts(recipe: Recipe) -> list[tuple[Source, int]]:
    """Every (training source, part index), in recipe order: the units that array tasks share out."""
    return [(src, i) for src, _ in training_sources(recipe) for i in range(len(part_inputs(src)))]


def missing_signatures(recipe: Recipe) -> list[tuple[Source, int]]:
    return [(src, i) for src, i in all_parts(recipe)
            if not signature_file(recipe, src, i, part_inputs(src)[i]).is_file()]


def load_signatures(recipe: Recipe) -> dict[str, list[PartSignatures]]:
    out: dict[str, list[PartSignatures]] = {}
    for src, i in all_parts(recipe):
        with np.load(signature_file(recipe, src, i, part_inputs(src)[i])) as z:
            out.setdefault(src.name, []).append(PartSignatures(z["exact"], z["content"], z["minhash"]))
    return out


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class Removed:
    """What deduplication drops from one source: counts, and the documents by part."""

    exact: int = 0
    near: int = 0
    against: dict[str, int] = field(default_factory=dict)  # the source of the kept copy -> documents
    heldout: int = 0  # held-out documents dropped for a near duplicate in a training split
    drops: dict[int, list[int]] = field(default_factory=dict)  # part -> document indices in the part

    def drop(self, part: int, doc: int) -> None:
        self.drops.setdefault(part, []).append(doc)

    def digest(self) -> str:
        blob = json.dumps(sorted((p, sorted(d)) for p, d in self.drops.items()))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def summary(self) -> dict:
        return {"exact": self.exact, "near": self.near, "against": dict(sorted(self.against.items())),
                "heldout_near_train": self.heldout, "digest": self.digest()}


@dataclass
class _Index:
    """Kept documents of one group: exact hashes and a MinHash-LSH over their signatures."""

    threshold: float
    num_perm: int
    exact: dict[int, str] = field(default_factory=dict)
    owners: list[tuple[str, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm) if self.num_perm else None

    def match(self, exact: int, minhash: np.ndarray, rule: Rule) -> tuple[str, str] | None:
        """("exact" | "near", source of the earliest kept copy), or None."""
        if rule.method == "none":
            return None
        if exact in self.exact:
            return "exact", self.exact[exact]
        if rule.method != "minhash" or self.lsh is None or not len(minhash) or not minhash.any():
            return None
        from datasketch import LeanMinHash

        found = [k for k in self.lsh.query(LeanMinHash(seed=1, hashvalues=minhash))
                 if np.mean(self.owners[k][1] == minhash) >= rule.threshold]
        return ("near", self.owners[min(found)][0]) if found else None

    def add(self, source: str, exact: int, minhash: np.ndarray) -> None:
        self.exact.setdefault(exact, source)
        if self.lsh is not None and len(minhash) and minhash.any():
            from datasketch import LeanMinHash

            self.lsh.insert(len(self.owners), LeanMinHash(seed=1, hashvalues=minhash))
            self.owners.append((source, minhash))


def plan_dedup(recipe: Recipe, signatures: dict[str, list[PartSignatures]]) -> dict[str, Removed]:
    """What to drop from each training source (see the module docstring)."""
    rule_of = rules(recipe)
    d = recipe.data.dedup
    num_perm = d.num_perm
    lowest = min([r.threshold for r in rule_of.values()] + [d.threshold])
    groups: dict[int, _Index] = {}
    removed = {name: Removed() for name in rule_of}
    kept: list[tuple[str, int, int, PartSignatures]] = []
    for src, _ in training_sources(recipe):
        rule = rule_of[src.name]
        index = groups.setdefault(rule.group, _Index(lowest, num_perm))
        for p, sig in enumerate(signatures[src.name]):
            for i in range(len(sig.exact)):
                mh = sig.minhash[i]
                hit = index.match(int(sig.exact[i]), mh, rule)
                if hit is None:
                    index.add(src.name, int(sig.exact[i]), mh)
                    kept.append((src.name, p, i, sig))
                    continue
                r = removed[src.name]
                setattr(r, hit[0], getattr(r, hit[0]) + 1)
                r.against[hit[1]] = r.against.get(hit[1], 0) + 1
                r.drop(p, i)
    heldout = [is_heldout_hash(int(sig.content[i]), recipe.data.heldout) for _, _, i, sig in kept]
    train = _Index(d.threshold, num_perm)
    for (name, _, i, sig), held in zip(kept, heldout):
        if not held:
            train.add(name, int(sig.exact[i]), sig.minhash[i])
    clean = Rule("minhash", d.threshold, 0)
    for (name, p, i, sig), held in zip(kept, heldout):
        if held and train.match(int(sig.exact[i]), sig.minhash[i], clean) is not None:
            removed[name].heldout += 1
            removed[name].drop(p, i)
    return removed
