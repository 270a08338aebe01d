"""Pack documents (BOS ... EOS) into fixed-length windows and write them as webdataset tar
shards, each shard under a temporary name until complete (so no shard is ever half-written).

Every stored window holds window+1 tokens: the extra one is the first token of the next
window (PAD if there is none), so a window gives its own next-token labels without a second
read, and consecutive windows join into longer sequences.  Each window also carries the
offsets where documents start in it (`doc_starts.npy`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import webdataset as wds


class ShardWriter:
    """Numbered shards `<prefix>-NNNN.tar` of `shard_windows` windows each.  A shard whose
    final name already exists (complete, from an interrupted earlier run of the same build)
    is left untouched: its windows are only counted."""

    def __init__(self, directory: Path, prefix: str, shard_windows: int):
        self.dir, self.prefix, self.shard_windows = directory, prefix, shard_windows
        self.records: list[dict] = []
        self._part, self._n, self._docs, self._tar, self._tmp = 0, 0, 0, None, None

    def _final(self) -> Path:
        return self.dir / f"{self.prefix}-{self._part:04d}.tar"

    def add(self, window: np.ndarray, doc_starts: np.ndarray) -> None:
        if self._n == 0:
            final = self._final()
            if not final.exists():
                self.dir.mkdir(parents=True, exist_ok=True)
                self._tmp = final.with_name(final.name + f".tmp{os.getpid()}")
                self._tar = wds.TarWriter(str(self._tmp))
        if self._tar is not None:
            self._tar.write({"__key__": f"{self.prefix}-{self._part:04d}-{self._n:06d}",
                             "tokens.npy": window, "doc_starts.npy": doc_starts})
        self._n += 1
        self._docs += len(doc_starts)
        if self._n == self.shard_windows:
            self._close()

    def _close(self) -> None:
        if self._n == 0:
            return
        final = self._final()
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, final)  # atomic: the shard appears complete or not at all
        self.records.append({"path": str(final.relative_to(self.dir.parent)),
                             "samples": self._n, "documents": self._docs})
        self._part, self._n, self._docs, self._tar = self._part + 1, 0, 0, None

    def close(self) -> list[dict]:
        self._close()
        return self.records


class Packer:
    def __init__(self, window: int, dtype: str, pad_id: int, writer: ShardWriter):
        self.window, self.dtype, self.pad_id, self.writer = window, np.dtype(dtype), pad_id, writer
        self.buf = np.empty(0, self.dtype)
        self.starts = np.empty(0, np.int64)  # document starts, as offsets into buf
        self.tokens = 0  # tokens written (window tokens, excluding the lookahead one)

    def add(self, tokens: np.ndarray, doc_lens: np.ndarray) -> None:
        starts = len(self.buf) + np.concatenate([[0], np.cumsum(doc_lens)[:-1]])
        buf = np.concatenate([self.buf, tokens.astype(self.dtype, copy=False)])
        all_starts = np.concatenate([self.starts, starts])
        w = self.window
        n = (len(buf) - 1) // w  # a window is complete once the token after it is known
        cuts = np.searchsorted(all_starts, np.arange(n + 1) * w)
        for i in range(n):
            ds = (all_starts[cuts[i]:cuts[i + 1]] - i * w).astype(np.int32)
            self.writer.add(buf[i * w:(i + 1) * w + 1], ds)
        self.tokens += n * w
        self.buf, self.starts = buf[n * w:], all_starts[cuts[n]:] - n * w

    def finish(self) -> tuple[list[dict], int]:
        """Close the last shard; returns (shard records, tokens dropped at the end)."""
        dropped = len(self.buf)
        if dropped == self.window:  # exactly one full window left: its lookahead is PAD
            self.writer.add(np.append(self.buf, self.dtype.type(self.pad_id)),
                            self.starts.astype(np.int32))
            self.tokens += self.window
            dropped = 0
        records = self.writer.close()
        for r in records:
            r["tokens"] = r["samples"] * self.window
        return records, dropped
