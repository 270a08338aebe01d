"""One source's samples: the k-th sample, over endless epochs, as tokens read from shards.

A sample is any run of seq_len tokens (plus the next one, for the labels) inside the token
stream of one shard; the shard's windows are contiguous, so a sample may join several
windows (seq_len longer than the window) or lie inside one.  Epoch e visits the shards in a
seeded order and the samples of each shard in a seeded order: the k-th sample is found by
arithmetic, so nothing is replayed on resume and no rank ever runs out of data.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from retnet_train.data.errors import DataError
from retnet_train.data.manifest import Manifest, Shard
from retnet_train.data.shard_reader import ShardReader

MAX_OPEN_SHARDS = 8  # per source and process; a sample's shard is usually the last one used


class SampleReader:
    """Reads the j-th seq_len sample of a list of shards (opened lazily, per process)."""

    def __init__(self, manifest: Manifest, shards: tuple[Shard, ...], seq_len: int):
        self.m, self.shards, self.seq_len = manifest, shards, seq_len
        self.samples = np.array([s.samples * manifest.window // seq_len for s in shards], np.int64)
        self._open: OrderedDict[int, ShardReader] = OrderedDict()

    def __getstate__(self):  # open file descriptors stay in the process that opened them
        return {**self.__dict__, "_open": OrderedDict()}

    def _reader(self, i: int) -> ShardReader:
        r = self._open.get(i)
        if r is None:
            r = ShardReader(self.shards[i].path, self.m.window + 1, self.m.dtype)
            if len(r) != self.shards[i].samples:
                raise DataError(f"{self.shards[i].path}: {len(r)} windows, manifest.json says "
                                 f"{self.shards[i].samples}")
            self._open[i] = r
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(i)
        return r

    def read(self, shard: int, j: int, out: np.ndarray) -> None:
        """Fill out (seq_len + 1 tokens) with sample j of the shard and its next token."""
        n, t = self.m.window, self.seq_len
        r = self._reader(shard)
        p0 = j * t
        w0, w1 = p0 // n, (p0 + t - 1) // n
        # Stored windows carry one lookahead token, so windows w0..w1 hold tokens
        # [w0*n, (w1+1)*n] of the shard's stream: the inputs and the token after them.
        wins = [r.read(w) for w in range(w0, w1 + 1)]
        arr = wins[0] if len(wins) == 1 else np.concatenate([w[:n] for w in wins[:-1]] + [wins[-1]])
        off = p0 - w0 * n
        out[:] = arr[off:off + t + 1]
        # An id past the tokenizer's pieces (a corrupt shard) would index an untrained row of
        # the padded embedding, or past it, silently: one max per sample makes it an error.
        if int(out.max()) >= self.m.n_pieces:
            self._bad_token(shard, w0, w1, off, out)

    def _bad_token(self, shard: int, w0: int, w1: int, off: int, out: np.ndarray) -> None:
        i = int(np.argmax(out >= self.m.n_pieces))
        # position p of the windows joined from w0 is window w0 + p // n's own token; only the
        # very last one is the lookahead slot of window w1, the last window read
        w = min(w0 + (off + i) // self.m.window, w1)
        raise DataError(f"{self.shards[shard].path}: window {w}: token id {int(out[i])} is not "
                        f"below the tokenizer's {self.m.n_pieces} pieces (a corrupt shard?)")


class SourceSampler:
    def __init__(self, manifest: Manifest, seq_len: int, seed: int, index: int):
        self.reader = SampleReader(manifest, manifest.shards, seq_len)
        counts = self.reader.samples
        if counts.sum() == 0:
            raise ValueError(f"source {manifest.source} ({manifest.dir}): no shard holds even one "
                             f"sample of seq_len {seq_len}")
        self.live = np.flatnonzero(counts)  # shards with at least one sample
        self.per_epoch = int(counts.sum())
        self.seed, self.index = seed, index
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perm: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _order(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != e:
            rng = np.random.default_rng([self.seed, self.index, e])
            order = self.live[rng.permutation(len(self.live))]
            self._epoch = (e, order, np.cumsum(self.reader.samples[order]))
        return self._epoch[1], self._epoch[2]

    def _within(self, e: int, shard: int) -> np.ndarray:
        perm = self._perm.get((e, shard))
        if perm is None:
            rng = np.random.default_rng([self.seed, self.index, e, shard, 1])
            perm = self._perm[(e, shard)] = rng.permutation(int(self.reader.samples[shard]))
            if len(self._perm) > MAX_OPEN_SHARDS:
                self._perm.popitem(last=False)
        return perm

    def locate(self, k: int) -> tuple[int, int]:
        """The source's k-th sample -> (shard index, sample index within the shard)."""
        e, r = divmod(int(k), self.per_epoch)
        order, cum = self._order(e)
        pos = int(np.searchsorted(cum, r, side="right"))
        shard = int(order[pos])
        first = r - (int(cum[pos - 1]) if pos else 0)
        return shard, int(self._within(e, shard)[first])

    def read(self, k: int, out: np.ndarray) -> None:
        self.reader.read(*self.locate(k), out)
