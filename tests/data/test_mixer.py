"""The mixer with many sources: the vectorised rule chooses exactly as the loop does."""

from __future__ import annotations

import numpy as np

from pipeline.data import mixer
from pipeline.data.mixer import Mixer


def test_many_sources_are_mixed_exactly_as_the_loop_mixes_them(monkeypatch):
    rng = np.random.default_rng(3)
    shares = [1 / 3] * 60 + [0.1 + 1e-13] * 20 + rng.random(120).tolist()  # exact and near ties
    assert len(shares) >= mixer.VECTOR_FROM
    counts = [0] * len(shares)
    vectorised = Mixer(shares).assign(counts, 0, 2000)
    chosen = Mixer(shares).choose(counts, 2000)
    monkeypatch.setattr(mixer, "VECTOR_FROM", 10**9)
    loop_counts = [0] * len(shares)
    assert Mixer(shares).assign(loop_counts, 0, 2000) == vectorised
    assert counts == loop_counts
    assert Mixer(shares).choose(loop_counts, 2000) == chosen
