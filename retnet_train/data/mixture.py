"""Which source each global sample comes from, with random access.

The global sample sequence is cut into blocks of BLOCK samples.  Every block holds each
source exactly round(weight * BLOCK) times (largest remainder), in a seeded random order.
So proportions are exact block by block, and the number of earlier samples of the same
source -- the sample's index within its source -- is a closed form, not a running count:
any rank can start anywhere in the stream without replaying it.
"""
from __future__ import annotations

import numpy as np

BLOCK = 4096


def rounded_counts(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Samples of each source per block: its share of `block`, largest remainder (may be 0)."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: block - counts.sum()]] += 1
    return counts


def block_counts(weights: list[float], block: int = BLOCK) -> np.ndarray:
    counts = rounded_counts(weights, block)
    if (counts == 0).any():
        raise ValueError(f"a weight below 1/{block} of the total rounds to no sample at all: "
                         f"weights {list(weights)}")
    return counts


class Mixture:
    def __init__(self, weights: list[float], seed: int, block: int = BLOCK):
        self.counts, self.seed, self.block = block_counts(weights, block), seed, block
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != b:
            rng = np.random.default_rng([self.seed, 0x6D1, b])
            src = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))
            order = np.argsort(src, kind="stable")
            first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
            rank = np.empty(self.block, np.int64)
            rank[order] = np.arange(self.block) - first[src[order]]
            self._cached = (b, src, rank)
        return self._cached[1], self._cached[2]

    def lookup(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source index, index of the sample within its source)."""
        g = np.asarray(g, np.int64)
        src, k = np.empty_like(g), np.empty_like(g)
        blocks, offs = np.divmod(g, self.block)
        for b in np.unique(blocks):
            sel = blocks == b
            s, r = self._block(int(b))
            src[sel] = s[offs[sel]]
            k[sel] = b * self.counts[src[sel]] + r[offs[sel]]
        return src, k
