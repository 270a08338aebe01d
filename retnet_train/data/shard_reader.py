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


class ShardReader:
    def __init__(self, path: Path, stored_window: int, dtype: str):
        self.path, self.dtype = path, np.dtype(dtype)
        self.nbytes = stored_window * self.dtype.itemsize
        try:
            with tarfile.open(path) as tar:
                members = [m for m in tar.getmembers() if m.name.endswith(".tokens.npy")]
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{path}: unreadable shard: {e}") from e
        members.sort(key=lambda m: m.name)
        self.fd = os.open(path, os.O_RDONLY)
        # All windows of a source share dtype and shape, so every .npy has the same header
        # length: read it once and keep only the offsets of the raw token bytes.
        header = 0
        if members:
            with open(path, "rb") as f:
                f.seek(members[0].offset_data)
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dt = read_header(f)
                header = f.tell() - members[0].offset_data
            if shape != (stored_window,) or dt != self.dtype:
                raise ValueError(f"{path}: windows are {dt}{list(shape)}, the manifest says "
                                 f"{self.dtype}[{stored_window}]")
        self.offsets = np.array([m.offset_data + header for m in members], np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> np.ndarray:
        buf = os.pread(self.fd, self.nbytes, int(self.offsets[i]))
        if len(buf) != self.nbytes:
            raise ValueError(f"{self.path}: window {i} is truncated")
        return np.frombuffer(buf, self.dtype)

    def close(self) -> None:
        os.close(self.fd)
