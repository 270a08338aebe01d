"""Random access to the windows of one tar shard.

The tar's member table is read once (headers only); a window is then one pread of its
tokens.  So a rank reads only the windows it uses, not whole shards, and the read order can
be any permutation without a shuffle buffer.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from retnet_train.data.errors import DataError


def index_path(shard: Path) -> Path:
    """Sidecar that data_prep writes: the byte offset of every window's raw tokens."""
    return shard.with_name(shard.name[: -len(".tar")] + ".idx.npy")


class ShardReader:
    def __init__(self, path: Path, stored_window: int, dtype: str):
        self.path, self.dtype = path, np.dtype(dtype)
        self.nbytes = stored_window * self.dtype.itemsize
        idx = index_path(path)
        try:
            # data_prep writes the token offsets next to the shard; tars from elsewhere
            # are indexed here, once (slow: Python parses every header).
            self.offsets = np.load(idx) if idx.exists() else self._scan(stored_window)
            self.fd = os.open(path, os.O_RDONLY)
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable shard: {e}") from e

    def _scan(self, stored_window: int) -> np.ndarray:
        with tarfile.open(self.path) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".tokens.npy")]
        members.sort(key=lambda m: m.name)
        if not members:
            return np.empty(0, np.int64)
        # All windows of a source share dtype and shape, so every .npy has the same header
        # length: read it once.
        with open(self.path, "rb") as f:
            f.seek(members[0].offset_data)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dt = read_header(f)
            header = f.tell() - members[0].offset_data
        if shape != (stored_window,) or dt != self.dtype:
            raise ValueError(f"windows are {dt}{list(shape)}, the manifest says "
                             f"{self.dtype}[{stored_window}]")
        return np.array([m.offset_data + header for m in members], np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> np.ndarray:
        buf = os.pread(self.fd, self.nbytes, int(self.offsets[i]))
        if len(buf) != self.nbytes:
            raise DataError(f"{self.path}: window {i} is truncated")
        return np.frombuffer(buf, self.dtype)

    def close(self) -> None:
        os.close(self.fd)
