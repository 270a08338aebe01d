"""Pack documents (BOS ... EOS) into fixed-length windows and write them as webdataset tar
shards, each shard under a temporary name until complete (so no shard is ever half-written).

Every stored window holds window+1 tokens: the extra one is the first token of the next
window (PAD if there is none), so a window gives its own next-token labels without a second
read, and consecutive windows join into longer sequences.  Each window also carries the
offsets where documents start in it (`doc_starts.npy`).
"""
from __future__ import annotations

import functools
import io
import os
import tarfile
from pathlib import Path

import numpy as np

from retnet_train.data.shard_reader import index_path
from retnet_train.data.tokenizer import file_sha256

# webdataset's TarWriter stamps every member with a float mtime, which costs a PAX header
# per member (twice the members, slow to index).  Plain USTAR members with fixed metadata
# are read the same by webdataset, make byte-identical shards on a rerun, and have 512-byte
# headers, so the writer knows where each window's tokens land without rescanning the tar.
HEADER = tarfile.BLOCKSIZE


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: str, n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": (n,)})
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    # np.save rebuilds the same header for every window; it only depends on dtype and length
    return _npy_header(a.dtype.str, len(a)) + a.tobytes()


def shard_checksum(path: Path) -> dict:
    """The `bytes` and `sha256` of a finished shard, for its manifest record: what
    `data_prep verify` and the trainer's start-up check compare the file against."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


class ShardWriter:
    """Numbered shards `<prefix>-NNNN.tar` of `shard_windows` windows each, plus their index
    sidecar.  A shard whose final name already exists (complete, from an interrupted earlier
    run of the same build) is left untouched: its windows are only counted, and the file is
    hashed for its record."""

    def __init__(self, directory: Path, prefix: str, shard_windows: int):
        self.dir, self.prefix, self.shard_windows = directory, prefix, shard_windows
        self.records: list[dict] = []
        self._part, self._n, self._docs, self._tar, self._tmp = 0, 0, 0, None, None
        self._offsets: list[int] = []

    def _final(self) -> Path:
        return self.dir / f"{self.prefix}-{self._part:04d}.tar"

    def _member(self, name: str, data: bytes) -> int:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(data), 0o444, 0
        start = self._tar.offset + HEADER
        self._tar.addfile(ti, io.BytesIO(data))
        return start

    def add(self, window: np.ndarray, doc_starts: np.ndarray) -> None:
        if self._n == 0:
            final = self._final()
            if not final.exists():
                self.dir.mkdir(parents=True, exist_ok=True)
                self._tmp = final.with_name(final.name + f".tmp{os.getpid()}")
                self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
                self._offsets = []
        if self._tar is not None:
            key = f"{self.prefix}-{self._part:04d}-{self._n:06d}"
            tokens = _npy(window)
            start = self._member(key + ".tokens.npy", tokens)
            # offset of the raw tokens: past the tar header and the .npy header
            self._offsets.append(start + len(tokens) - window.nbytes)
            self._member(key + ".doc_starts.npy", _npy(doc_starts))
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
            idx_tmp = index_path(final).with_name(index_path(final).name + f".tmp{os.getpid()}")
            with open(idx_tmp, "wb") as f:
                np.save(f, np.asarray(self._offsets, np.int64))
            # the index first, then the shard: a shard that exists always has its index,
            # and each appears complete or not at all
            os.replace(idx_tmp, index_path(final))
            os.replace(self._tmp, final)
        # Hashed right after the rename, while the file is still in the page cache: a
        # re-read costs ~1/1000 of the encoding that made it.
        self.records.append({"path": str(final.relative_to(self.dir.parent)),
                             "samples": self._n, "documents": self._docs, **shard_checksum(final)})
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
