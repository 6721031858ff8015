"""The stream: a stage's packed, mixed batches for one rank, resumable from a tiny state.

Every sample is a pure function of (seed, source fingerprints, stage, global sample index):

* `SourceWindows` turns a source's shards into an endless sequence of packed windows. Epoch e
  visits the shards in a seeded order and, inside each shard, the documents in a seeded order;
  window k starts at token k * seq_len of that endless stream. Finding window k costs a binary
  search over the shards of its epoch, so skipping ahead is O(shards), never O(samples).
* The `Mixer` decides which source supplies global sample n (largest deficit, exact shares).
* Each optimizer step consumes `batch.global` consecutive global samples; rank r takes the r-th
  contiguous slice of them, cut into `grad_accum` micro-batches. With the same global batch, any
  world size sees the same global order.

The state is the number of global samples consumed plus each source's cursor (windows read so
far, over all stages), so replayed sources continue where they stopped. It is checked against
the shard fingerprints: data that changed under a run is refused.

A stage with a new tokenizer (`tokenizer:` in the recipe) reads every component of its mixture,
own and replayed, from the shards of that tokenizer. A replayed source's cursor then counts
windows of the old tokenization; `mode: continue` carries it over proportionally (the same share
of the stream's epochs already read: k -> floor(k x new epoch tokens / old epoch tokens)), and
`resample` draws from that many windows of the new stream. The shuffles are seeded by the shard
fingerprint, so the new windows are not the same documents, only the same amount of the source;
the state records each conversion under `retokenized`.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from pipeline.data.buffers import BUFFERS, owner_id
from pipeline.data.context import StageContext
from pipeline.data.mixer import Mixer
from pipeline.data.packer import pack
from pipeline.data.shards import PreparedSource, load_shard, prepared_tokens
from pipeline.errors import ResumeError, StrataError
from pipeline.recipe.plan import StagePlan, build_plan, grad_accum
from pipeline.recipe.spec import Recipe

STATE_VERSION = 1


class SourceWindows:
    """Window k (seq_len + 1 tokens) of one source's endless, epoch-shuffled token stream."""

    shuffle = True  # shards and windows in a seeded order per epoch

    def __init__(self, recipe: Recipe, name: str, seq_len: int, tokenizer: str | None = None,
                 prepared: PreparedSource | None = None):
        prepared = prepared or PreparedSource.read(recipe, name, tokenizer)  # a stream hands its own down
        self.name = name
        self.seq_len = seq_len
        self.eos_id = prepared.manifest["tokenizer"]["eos_id"]
        self.fingerprint = prepared.fingerprint
        self.shards = prepared.shards("train")
        if not self.shards:
            raise StrataError(f"{prepared.folder}: source {name!r} has no train shards")
        # Each document is followed by one EOS token.
        self.shard_lengths = np.array([s["tokens"] + s["documents"] for _, s in self.shards], dtype=np.int64)
        self.epoch_tokens = int(self.shard_lengths.sum())
        self._seed = [recipe.seed & 0xFFFFFFFF, zlib.crc32(name.encode()), int(self.fingerprint[:8], 16)]
        self._layouts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._owner, self._budget = owner_id(), recipe.data.buffer_mb << 20  # shard buffers: pipeline/data/buffers.py
        self._last: tuple[int, int, tuple] | None = None  # (start, end, buffer key) of the last shard read

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([*self._seed, *keys])

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard order of an epoch and the token offset at which each shard starts."""
        if epoch not in self._layouts:
            n = len(self.shards)
            order = self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)
            starts = np.zeros(n, dtype=np.int64)
            np.cumsum(self.shard_lengths[order][:-1], out=starts[1:])
            self._layouts[epoch] = (order, starts)
            if len(self._layouts) > 4:
                self._layouts.popitem(last=False)
        return self._layouts[epoch]

    def _buffer(self, epoch: int, shard: int) -> np.ndarray:
        """The shard's documents in this epoch's order, each followed by EOS."""
        return BUFFERS.get_or_make((self._owner, epoch, shard), lambda: self._make_buffer(epoch, shard), self._budget)

    def _make_buffer(self, epoch: int, shard: int) -> np.ndarray:
        path, meta = self.shards[shard]
        values, offsets = load_shard(path, meta["sha256"])
        ndocs = len(offsets) - 1
        order = self._rng(epoch, shard).permutation(ndocs) if self.shuffle else np.arange(ndocs)
        eos = np.array([self.eos_id], dtype=values.dtype)
        pieces = []
        for d in order:
            pieces.append(values[offsets[d]:offsets[d + 1]])
            pieces.append(eos)
        return np.concatenate(pieces)

    def read(self, position: int, count: int) -> np.ndarray:
        """`count` tokens of the endless stream starting at `position`."""
        last = self._last  # fast path: sequential windows mostly fall inside the shard read last
        if last is not None and last[0] <= position and position + count <= last[1]:
            buf = BUFFERS.get(last[2])
            if buf is not None:
                return buf[position - last[0]:position - last[0] + count]
        pieces = []
        while count > 0:
            epoch, offset = divmod(position, self.epoch_tokens)
            order, starts = self._layout(epoch)
            i = int(np.searchsorted(starts, offset, side="right")) - 1
            buf = self._buffer(epoch, int(order[i]))
            local = offset - int(starts[i])
            take = min(count, len(buf) - local)
            pieces.append(buf[local:local + take])
            first = epoch * self.epoch_tokens + int(starts[i])
            self._last = (first, first + len(buf), (self._owner, epoch, int(order[i])))
            position += take
            count -= take
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def window(self, k: int) -> np.ndarray:
        return self.read(k * self.seq_len, self.seq_len + 1)

    def windows_per_epoch(self) -> float:
        return self.epoch_tokens / self.seq_len


def _affine_permutation(k: int, n: int, seed: int, cycle: int) -> int:
    """Position of k in a seeded permutation of range(n): k -> (a k + b) mod n, a coprime to n.

    O(1) memory whatever n is; a different cycle gives a different offset and multiplier.
    """
    a, b = _affine_coefficients(n, seed, cycle)
    return (a * k + b) % n


@lru_cache(maxsize=64)
def _affine_coefficients(n: int, seed: int, cycle: int) -> tuple[int, int]:
    rng = np.random.default_rng([seed & 0xFFFFFFFF, n, cycle])
    a = int(rng.integers(1, max(2, n)))
    while math.gcd(a, n) != 1:
        a += 1
    return a, int(rng.integers(0, n))


def rank_slice(rank: int, world_size: int, global_batch: int) -> range:
    """Positions, inside one global batch, of the samples that `rank` trains on: a contiguous block."""
    per_rank = global_batch // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


@dataclass(frozen=True)
class ReadPlan:
    """A stage's plan with the manifests of its mixture's sources, read once: what a stream hands
    its DataLoader workers so that none of them plans or reads a manifest again."""

    plan: StagePlan
    prepared: dict[str, PreparedSource]


class StageStream:
    """Micro-batches of one stage for one rank: `next()`, `state_dict()`, `load_state_dict()`."""

    @classmethod
    def for_stage(cls, ctx: StageContext, carried: dict | None = None) -> StageStream:
        """The stream of the stage `ctx` describes, on its rank (the trainer's plan, built once)."""
        return cls(ctx.recipe, ctx.index, ctx.rank, ctx.world_size, carried, ctx.plan)

    def __init__(self, recipe: Recipe, stage_index: int, rank: int = 0, world_size: int = 1,
                 carried: dict | None = None, plan: StagePlan | ReadPlan | None = None):
        micro, global_batch = recipe.batch.micro, recipe.batch.global_
        accum = grad_accum(recipe, world_size)  # refuses a global batch that does not divide
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        prepared = plan.prepared if isinstance(plan, ReadPlan) else None
        plan = plan.plan if isinstance(plan, ReadPlan) else plan
        if plan is None:  # the trainer hands its plan down; other callers (scoring, tests) plan here
            plan = build_plan(recipe, prepared_tokens(recipe))[stage_index]
        self.plan = plan
        self.recipe, self.stage_index, self.stage = recipe, stage_index, plan.name
        self.rank, self.world_size = rank, world_size
        self.micro, self.global_batch = micro, global_batch
        self.grad_accum = accum
        self.steps = plan.steps
        self.names = [c.source for c in plan.mixture]
        self.resample = [c.resample for c in plan.mixture]
        self.mixer = Mixer([c.share for c in plan.mixture])
        self.tokenizer = recipe.tokenizer_at(stage_index)  # every component is read in this stage's tokens
        # Each source's manifest is read once per stage, here (or by the stream that hands `prepared` down).
        self.prepared = prepared if prepared is not None else {
            n: PreparedSource.read(recipe, n, self.tokenizer) for n in self.names}
        self.sources = [SourceWindows(recipe, n, recipe.seq_len, prepared=self.prepared[n]) for n in self.names]
        self.fingerprints = {s.name: s.fingerprint for s in self.sources}

        carried_cursors = dict(carried["cursors"]) if carried else {}
        self.retokenized: dict[str, dict] = {}
        if carried:
            carried = self._retokenize(carried, carried_cursors)
            self._check_fingerprints(carried, only_common=True)
        self.stage_start = {n: carried_cursors.get(n, 0) for n in self.names}
        self.other_cursors = {n: c for n, c in carried_cursors.items() if n not in self.stage_start}
        self.other_fingerprints = {n: f for n, f in (carried or {}).get("fingerprints", {}).items()
                                   if n not in self.fingerprints}
        self.counts = [0] * len(self.names)  # samples each source supplied in this stage
        self.samples = 0  # global samples of this stage consumed by completed steps
        self._pending: list[dict[str, torch.Tensor]] = []

    def _retokenize(self, carried: dict, cursors: dict[str, int]) -> dict:
        """Carry cursors of sources that earlier stages read under another tokenizer into this
        stage's token stream, proportionally (see the module docstring). Updates `cursors`."""
        theirs = carried.get("fingerprints", {})
        fingerprints = dict(theirs)
        for src in self.sources:
            fp = theirs.get(src.name)
            if fp is None or fp == src.fingerprint:
                continue
            for tok in self.recipe.tokenizers():  # the tokenizer whose shards the cursor counts in
                before = PreparedSource.find(self.recipe, src.name, tok) if tok != self.tokenizer else None
                if before is not None and before.fingerprint == fp:
                    old = cursors.get(src.name, 0)
                    cursors[src.name] = old * src.epoch_tokens // before.epoch_tokens
                    self.retokenized[src.name] = {"from": fp, "to": src.fingerprint, "cursor": [old, cursors[src.name]]}
                    fingerprints[src.name] = src.fingerprint
                    break
        return {**carried, "fingerprints": fingerprints}

    # ---------------------------------------------------------------------------------------
    def __iter__(self) -> StageStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            if self.finished():
                raise StopIteration
            self._pending = list(self._step_batches(self._assign_step()))
        return self._pending.pop(0)

    def finished(self) -> bool:
        return self.steps is not None and self.samples >= self.steps * self.global_batch

    def _assign_step(self) -> list[tuple[int, int, int]]:
        """Decide the sources of the next global batch: (global index, source, count) of this rank's samples."""
        first = self.samples
        assigned = self.mixer.assign(self.counts, first, self.global_batch)
        self.samples += self.global_batch
        return [(first + i, *assigned[i]) for i in rank_slice(self.rank, self.world_size, self.global_batch)]

    def close(self) -> None:
        """Nothing to release (the same surface as StreamLoader, whose workers end here)."""

    def skip_step(self) -> None:
        """Advance the state by one optimizer step without reading any data (the state of a loader
        whose batches are produced by worker processes)."""
        self.mixer.assign(self.counts, self.samples, self.global_batch)
        self.samples += self.global_batch

    def _step_batches(self, mine: list[tuple[int, int, int]], keep=lambda m: True):
        """This rank's micro-batches of one step (those for which keep(m) holds)."""
        eos = self.sources[0].eos_id  # one tokenizer per stage: every source shares it
        for m in range(self.grad_accum):
            if not keep(m):
                continue
            chunk = mine[m * self.micro:(m + 1) * self.micro]
            windows = np.stack([self.window(s, count) for _, s, count in chunk])
            inputs, labels, positions = pack(windows, eos)
            yield {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                   "position_ids": torch.from_numpy(positions),
                   "index": torch.tensor([g for g, _, _ in chunk], dtype=torch.int64),
                   # each row's source (its position in the stage's mixture): RHO-1 reports per source
                   "source": torch.tensor([s for _, s, _ in chunk], dtype=torch.int64)}

    def micro_batches(self, worker: int = 0, num_workers: int = 1):
        """The rest of the stage's micro-batches, only every `num_workers`-th from `worker` on.

        A DataLoader asks its workers in turn, so workers 0..N-1 running this together deliver the
        stream in its exact order; every worker runs the (cheap) mixer for all samples, and reads
        tokens only for the micro-batches it delivers.
        """
        j = 0
        while not self.finished():
            mine = self._assign_step()
            yield from self._step_batches(mine, keep=lambda m, j=j: (j + m) % num_workers == worker)
            j += self.grad_accum

    def window(self, source: int, count: int) -> np.ndarray:
        """The window that is the `count`-th of this stage from source index `source`.

        A replayed source in `resample` mode draws again from the windows read before this stage
        (a seeded permutation of them, a new one each time they are all used); otherwise it reads
        on from its cursor.
        """
        src = self.sources[source]
        start = self.stage_start[src.name]
        if self.resample[source] and start > 0:
            cycle, k = divmod(count, start)
            return src.window(_affine_permutation(k, start, self.recipe.seed + self.stage_index, cycle))
        return src.window(start + count)

    def global_sources(self, start: int, count: int) -> list[str]:
        """Names of the sources of global samples start .. start+count-1 (for reports and tests)."""
        counts = [0] * len(self.names)
        self.mixer.assign(counts, 0, start)
        return [self.names[s] for s, _ in self.mixer.assign(counts, start, count)]

    # ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._pending:
            raise RuntimeError("StageStream.state_dict() is only defined at optimizer-step boundaries")
        cursors = dict(self.other_cursors)
        for n, c, resample in zip(self.names, self.counts, self.resample):
            cursors[n] = self.stage_start[n] + (0 if resample else c)  # resampling reads nothing new
        return {
            "version": STATE_VERSION, "stage": self.stage, "stage_index": self.stage_index,
            "samples": self.samples, "steps_done": self.samples // self.global_batch,
            "global_batch": self.global_batch, "seq_len": self.recipe.seq_len, "seed": self.recipe.seed,
            "counts": dict(zip(self.names, self.counts)), "cursors": cursors,
            "stage_start": dict(self.stage_start),
            "fingerprints": {**self.other_fingerprints, **self.fingerprints},
            **({"retokenized": self.retokenized} if self.retokenized else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ResumeError(f"stream state version {state.get('version')} is not {STATE_VERSION}")
        for key, mine in (("stage", self.stage), ("global_batch", self.global_batch),
                          ("seq_len", self.recipe.seq_len), ("seed", self.recipe.seed)):
            if state[key] != mine:
                raise ResumeError(f"cannot resume: the checkpoint's stream has {key}={state[key]!r}, "
                                  f"the recipe now gives {mine!r}")
        if sorted(state["counts"]) != sorted(self.names):
            raise ResumeError(f"cannot resume: the checkpoint's stage mixes {sorted(state['counts'])}, "
                              f"the recipe now mixes {sorted(self.names)}")
        self._check_fingerprints(state, only_common=False)
        self.stage_start = {n: state["stage_start"][n] for n in self.names}
        self.counts = [state["counts"][n] for n in self.names]
        self.other_cursors = {n: c for n, c in state["cursors"].items() if n not in self.stage_start}
        self.other_fingerprints = {n: f for n, f in state["fingerprints"].items() if n not in self.fingerprints}
        self.samples = state["samples"]
        self.retokenized = dict(state.get("retokenized", {}))
        self._pending = []

    def _check_fingerprints(self, state: dict, only_common: bool) -> None:
        for name, fp in self.fingerprints.items():
            theirs = state.get("fingerprints", {}).get(name)
            if theirs is None and only_common:
                continue
            if theirs != fp:
                raise ResumeError(f"{self.prepared[name].folder}: the shards of source {name!r} changed since the "
                                  f"checkpoint (fingerprint {theirs} -> {fp}); restore them or start a new run")
