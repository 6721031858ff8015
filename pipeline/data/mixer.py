"""The mixer: a deterministic interleaving of sources that holds their shares at every prefix.

Weights are shares of tokens; every sample the stream yields has the same number of tokens
(seq_len), so shares of tokens are shares of samples. Sample n goes to the source with the
largest deficit `share * (n + 1) - count` (ties to the first source), Megatron's blending rule:
after any n samples each source's count is within one sample of `share * n`. No random draws, so
the mixture of a 10-step run is already exact, and the only state is the per-source counts.
"""

from __future__ import annotations

from collections.abc import Sequence


class Mixer:
    def __init__(self, shares: Sequence[float]):
        total = float(sum(shares))
        if not shares or total <= 0 or min(shares) < 0:
            raise ValueError(f"mixer shares must be non-negative and sum to > 0, got {list(shares)}")
        self.shares = [s / total for s in shares]

    def choose(self, counts: Sequence[int], n: int) -> int:
        """The source that supplies sample n, given how many samples each source supplied before it."""
        best, best_deficit = 0, float("-inf")
        for i, (share, count) in enumerate(zip(self.shares, counts)):
            deficit = share * (n + 1) - count
            if deficit > best_deficit + 1e-12:
                best, best_deficit = i, deficit
        return best

    def assign(self, counts: list[int], n: int, k: int) -> list[tuple[int, int]]:
        """Sources of samples n .. n+k-1 as (source index, that source's count before the sample).

        Advances `counts` in place.
        """
        out = []
        for i in range(n, n + k):
            s = self.choose(counts, i)
            out.append((s, counts[s]))
            counts[s] += 1
        return out
