"""Shard buffers of the stream: one cache per process, bounded in bytes, shared by every source.

Invariant: what a window contains never depends on this cache (a buffer is a pure function of its
key); only how often a shard is decompressed again does. A stage that mixes many sources touches
all of them every few steps, so per-source buffers would hold sources x shard size (32 GB per
rank for 1,000 sources at the default shard size, docs/scale.md); here the least recently used
buffers go once `data.buffer_mb` is exceeded, and a source read again loads its shard again.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

_owners = itertools.count()  # a unique id per reader: object ids are reused after collection


def owner_id() -> int:
    return next(_owners)


class BufferCache:
    def __init__(self) -> None:
        self.items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.bytes = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        buf = self.items.get(key)
        if buf is not None:
            self.items.move_to_end(key)
        return buf

    def get_or_make(self, key: Hashable, make: Callable[[], np.ndarray], budget: int) -> np.ndarray:
        """The buffer of `key`, made now if absent; evicts the least recently used past `budget`
        bytes (never the one just made)."""
        buf = self.get(key)
        if buf is None:
            buf = make()
            self.items[key] = buf
            self.bytes += buf.nbytes
            while self.bytes > budget and len(self.items) > 1:
                _, old = self.items.popitem(last=False)
                self.bytes -= old.nbytes
        return buf


BUFFERS = BufferCache()
