"""Check the configured shards before step 1, so that a missing, truncated or overwritten
shard stops the run at start-up with its name, not hours later inside a loader worker.

Per shard (train and val) the cheap check costs a stat and a few small reads: the file
exists and has the manifest's size; its first tar header is a valid ustar header of a
`.tokens.npy` member whose data is a .npy of one window; the index sidecar exists, holds
exactly the manifest's number of windows, starts at that first window and ends inside the
file.  `full=True` also hashes every shard against the manifest's sha256.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from retnet_train.data.config import DataConfig
from retnet_train.data.errors import DataError
from retnet_train.data.manifest import Manifest, Shard
from retnet_train.data.plan import load_sources
from retnet_train.data.shard_reader import index_path
from retnet_train.data.tokenizer import file_sha256

log = logging.getLogger(__name__)

MAX_LISTED = 20          # problems spelled out in the error; the count is always exact
NPY_MAGIC = b"\x93NUMPY"
SHARD_HEAD = 1024        # the first tar header (512) and the first window's .npy header
INDEX_HEAD = 256         # the index's .npy header (128) and its first offsets
# Threads, not processes: every check waits on the file system (a metadata round trip on
# Lustre or NFS), and reads and hashing release the GIL.
THREADS = min(32, 4 * (os.cpu_count() or 1))
BATCH = 64  # shards per thread-pool task: a task per shard costs more than its check


class _Bad(Exception):
    """One problem with one file; the message says what, the caller adds which file."""


def verify_sources(cfg: DataConfig, seq_len: int, full: bool = False) -> None:
    """Raise DataError if any configured source is unusable, listing every problem found
    (the first MAX_LISTED, then a count), one line each, naming the file.

    Checks what load_sources checks (config, manifests complete, tokenizer sha256), that
    every source has a training sample of `seq_len` tokens (and a validation one when
    cfg.val_batches > 0), and every train and val shard as the module docstring says.
    Manifests of an older data_prep record no shard `bytes`: the size check is skipped
    for them.  With `full`, a manifest without shard sha256s is itself an error (it cannot
    be checked; rerunning the same `data_prep shards` command adds them without encoding
    anything again).  Every failure is a DataError, missing files included."""
    t0 = time.monotonic()
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    try:
        _, manifests = load_sources(cfg)
    except DataError:
        raise
    except (FileNotFoundError, ValueError) as e:  # a missing manifest or tokenizer, a bad key
        raise DataError(str(e)) from e
    problems = [p for name, m in manifests.items()
                for p in _sample_problems(name, m, seq_len, cfg.val_batches)]
    shards = [(m, s) for m in manifests.values() for s in m.shards + m.val_shards]
    with ThreadPoolExecutor(THREADS) as pool:
        batches = [shards[i:i + BATCH] for i in range(0, len(shards), BATCH)]
        checked = [p for ps in pool.map(lambda b: [_check(*ms) for ms in b], batches) for p in ps]
        problems += [p for p in checked if p]
        if full:  # hashing a shard already found bad would only repeat its problem
            good = [s for (_, s), p in zip(shards, checked) if p is None]
            problems += _hash_problems(manifests, good, pool)
    _raise(problems)
    log.info("data verified: %d shards (%d windows) of %d sources%s in %.1f s", len(shards),
             sum(s.samples for _, s in shards), len(manifests),
             ", sha256 included" if full else "", time.monotonic() - t0)


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{len(problems)} problems with the configured data:\n  "
                        + "\n  ".join(problems[:MAX_LISTED]) + more)


def _sample_problems(name: str, m: Manifest, seq_len: int, val_batches: int) -> list[str]:
    """The stream and the validation batches fail on these later: say it now, with the rest."""
    out = []
    if sum(s.samples * m.window // seq_len for s in m.shards) == 0:
        out.append(f"data.sources.{name}.path: {m.dir}: no training shard holds even one sample "
                   f"of seq_len {seq_len}")
    if val_batches and sum(s.samples * m.window // seq_len for s in m.val_shards) == 0:
        out.append(f"data.sources.{name}.path: {m.dir}: no validation sample of seq_len "
                   f"{seq_len} (rebuild with a larger --val-fraction, or set data.val_batches=0)")
    return out


def _check(m: Manifest, shard: Shard) -> str | None:
    """The cheap checks of one shard: None, or "PATH: what is wrong"."""
    path = shard.path
    try:
        size = os.stat(path).st_size
        if shard.bytes is not None and size != shard.bytes:
            raise _Bad(f"{size} bytes, manifest.json says {shard.bytes} (truncated or replaced)")
        first = _check_head(path, m)
        path = index_path(shard.path)  # from here on, problems are the index's
        _check_index(path, shard.samples, first, m, size)
    except FileNotFoundError:
        return f"{path}: missing"
    except (_Bad, OSError, ValueError) as e:
        return f"{path}: {e}"
    return None


def _check_head(path: Path, m: Manifest) -> int:
    """The shard's first member is a window's tokens, as data_prep writes it.  Returns the
    byte offset of that window's raw tokens (what the index must start with)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, SHARD_HEAD, 0)
    finally:
        os.close(fd)
    name = _ustar_member(head[:tarfile.BLOCKSIZE])
    if not name.endswith(".tokens.npy"):
        raise _Bad(f"first member is {name!r}, not a window's .tokens.npy")
    shape, dtype, header = _npy_layout(head[tarfile.BLOCKSIZE:], f"member {name}")
    if shape != (m.window + 1,) or dtype != np.dtype(m.dtype):
        raise _Bad(f"member {name} holds {dtype}{list(shape)}, manifest.json says "
                   f"{m.dtype}[{m.window + 1}]")
    return tarfile.BLOCKSIZE + header


def _ustar_member(block: bytes) -> str:
    """The name in a tar header block, if it is a valid ustar header of a regular file.
    Not tarfile.TarInfo.frombuf: it parses every field, half the time of the whole check."""
    if len(block) < tarfile.BLOCKSIZE or block[257:262] != b"ustar":
        raise _Bad("not a tar file: first header has no ustar magic")
    try:
        stored = int(block[148:156].strip(b"\0 ") or b"x", 8)
    except ValueError:
        raise _Bad("not a tar file: first header has no checksum") from None
    # the checksum is the byte sum of the header with its own field read as 8 spaces
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise _Bad("not a tar file: first header checksum is wrong")
    if block[156:157] not in (b"0", b"\0"):
        raise _Bad(f"first member is not a regular file (type {block[156:157]!r})")
    return block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")


def _check_index(path: Path, samples: int, first: int, m: Manifest, size: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, INDEX_HEAD, 0)
        shape, dtype, header = _npy_layout(head, "the index")
        if dtype != np.dtype("<i8") or len(shape) != 1:
            raise _Bad(f"the index holds {dtype}{list(shape)}, not int64 offsets")
        if shape[0] != samples:
            raise _Bad(f"{shape[0]} window offsets, manifest.json says {samples} windows")
        last_at = header + 8 * (samples - 1)
        tail = head[last_at:last_at + 8] if last_at + 8 <= len(head) else os.pread(fd, 8, last_at)
    finally:
        os.close(fd)
    if len(head) < header + 8 or len(tail) < 8:
        raise _Bad(f"truncated: fewer than the {samples} offsets its header announces")
    start, last = int.from_bytes(head[header:header + 8], "little"), int.from_bytes(tail, "little")
    if start != first:
        raise _Bad(f"first offset {start}, but the shard's first window starts at byte {first}")
    end = last + (m.window + 1) * np.dtype(m.dtype).itemsize
    if end > size:
        raise _Bad(f"the last window ends at byte {end}, past the shard's end ({size} bytes)")


def _npy_layout(buf: bytes, what: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of the .npy that `buf` starts with."""
    if buf[:6] != NPY_MAGIC:
        raise _Bad(f"{what} is not a .npy array (no .npy magic)")
    width = 2 if buf[6] == 1 else 4  # the header-length field: 2 bytes in format 1.0, else 4
    end = 8 + width + int.from_bytes(buf[8:8 + width], "little")
    if len(buf) < end:
        raise _Bad(f"{what}: .npy header truncated")
    return _parse_npy_header(bytes(buf[:end]))


# numpy parses .npy headers with ast.literal_eval, and CPython 3.11 before 3.11.8 can fail
# ("AST constructor recursion depth mismatch") when threads parse at the same time: one at a time
_AST_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4096)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    # Cached: the shards of a source share their headers, and literal_eval is the slowest step of
    # a cheap check.
    with _AST_LOCK:
        return _parse_npy_header_locked(header)


def _parse_npy_header_locked(header: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(f)
    return tuple(shape), dtype, len(header)


def _hash_problems(manifests: dict[str, Manifest], shards: list[Shard],
                   pool: ThreadPoolExecutor) -> list[str]:
    out = []
    for m in manifests.values():
        if any(s.sha256 is None for s in m.shards + m.val_shards):
            out.append(f"{m.dir / 'manifest.json'}: records no shard sha256 (written by an older "
                       "data_prep), so the shards cannot be fully checked; rerun the same "
                       "`python -m data_prep shards` command: it adds them, encoding nothing")
    todo = [s for s in shards if s.sha256 is not None]
    return out + [p for p in pool.map(_check_hash, todo) if p]


def _check_hash(shard: Shard) -> str | None:
    try:
        digest = file_sha256(shard.path)
    except OSError as e:
        return f"{shard.path}: unreadable: {e}"
    if digest != shard.sha256:
        return (f"{shard.path}: sha256 {digest[:16]}..., manifest.json says {shard.sha256[:16]}... "
                "(the file changed since it was written)")
    return None
