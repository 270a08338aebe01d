"""Stream documents out of raw corpus files, one at a time, never loading a file whole.

The reader follows from the file name: *.jsonl / *.json (one JSON object per line, C4's
c4-*.json.gz included), optionally .gz or .zst compressed, and *.parquet (read in record
batches).  Malformed records are reported as `Skip`s (file, line, reason) so the caller can
count them or, under --strict, stop; a truncated or corrupt *file* raises `CorruptFileError`.
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import zstandard

from retnet_train.data.errors import DataError

# zstd frames written with `zstd --long=31` declare a 2 GiB window; the library's default
# limit (128 MiB) refuses them.  The decoder only allocates what the frame really needs.
ZSTD_MAX_WINDOW = 2**31
READ_CHUNK = 1 << 20


class CorruptFileError(DataError):
    """A whole file cannot be read (truncated, not the format its name says)."""


@dataclass(frozen=True)
class Doc:
    text: str
    line: int  # 1-based line (jsonl) or 0-based row (parquet) in `file`


@dataclass(frozen=True)
class Skip:
    file: str
    line: int
    reason: str


Record = Union[Doc, Skip]


def file_format(path: str) -> str:
    name = Path(path).name.lower()
    for suffix, fmt in ((".parquet", "parquet"), (".jsonl.zst", "jsonl.zst"),
                        (".json.zst", "jsonl.zst"), (".jsonl.gz", "jsonl.gz"),
                        (".json.gz", "jsonl.gz"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise DataError(f"{path}: cannot tell the format from the file name "
                    "(expected .jsonl[.gz|.zst], .json[.gz|.zst] or .parquet)")


class CountingFile(io.RawIOBase):
    """Wraps a binary file and counts the compressed bytes consumed, for progress/ETA."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        self.pos += n or 0
        return n


def _zstd_chunks(raw, path: str) -> Iterator[bytes]:
    # decompressobj (not stream_reader) so that a frame cut short is *detected*: its `eof`
    # stays False.  Concatenated frames (pzstd, appended files) each get a fresh object.
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    obj, pending = dctx.decompressobj(), False
    while True:
        chunk = raw.read(READ_CHUNK)
        if not chunk:
            break
        while chunk:
            try:
                out = obj.decompress(chunk)
            except zstandard.ZstdError as e:
                raise CorruptFileError(f"{path}: corrupt zstd data: {e}") from e
            pending = not obj.eof
            if out:
                yield out
            chunk = obj.unused_data if obj.eof else b""
            if obj.eof:
                obj = dctx.decompressobj()
    if pending:
        raise CorruptFileError(f"{path}: truncated zstd file (the last frame never ends)")


def _gzip_chunks(raw, path: str) -> Iterator[bytes]:
    gz = gzip.GzipFile(fileobj=raw, mode="rb")
    try:
        while chunk := gz.read(READ_CHUNK):
            yield chunk
    except (EOFError, OSError, zlib.error) as e:
        raise CorruptFileError(f"{path}: corrupt or truncated gzip file: {e}") from e


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def _json_docs(lines: Iterator[bytes], path: str, field: str) -> Iterator[Record]:
    for lineno, raw_line in enumerate(lines, 1):
        if not raw_line.strip():
            continue
        try:
            obj = json.loads(raw_line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield Skip(path, lineno, f"undecodable bytes: {e.reason} at byte {e.start}")
            continue
        except json.JSONDecodeError as e:
            yield Skip(path, lineno, f"bad JSON: {e.msg} (column {e.colno})")
            continue
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            what = "missing" if not isinstance(obj, dict) or field not in obj else f"{type(text).__name__}"
            yield Skip(path, lineno, f"field {field!r} is {what}, not a string")
            continue
        if not text:
            yield Skip(path, lineno, f"field {field!r} is empty")
            continue
        yield Doc(text, lineno)


def _parquet_docs(path: str, field: str | None, raw) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(raw)
    except (pa.ArrowException, OSError) as e:
        raise CorruptFileError(f"{path}: not a readable parquet file: {e}") from e
    names = pf.schema_arrow.names
    if field is None:  # The Stack calls its text column `content`, most others `text`.
        field = "text" if "text" in names else "content" if "content" in names else None
    if field not in names:
        raise DataError(f"{path}: no text column {field!r}; columns are {names} (use --text-field)")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, bytes):
                    try:
                        text = text.decode("utf-8")
                    except UnicodeDecodeError as e:
                        yield Skip(path, row, f"undecodable bytes at byte {e.start}")
                        row += 1
                        continue
                if not isinstance(text, str) or not text:
                    yield Skip(path, row, f"column {field!r} is {'null' if text is None else 'empty'}")
                else:
                    yield Doc(text, row)
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise CorruptFileError(f"{path}: corrupt parquet data near row {row}: {e}") from e


class FileReader:
    """Iterate Doc/Skip records of one file.  `text_field` None means `text` (JSON lines) or
    `text`/`content` (parquet).  `bytes_read` follows the compressed bytes consumed (for the
    ETA; parquet files count only when finished)."""

    def __init__(self, path: str, text_field: str | None = None):
        self.path, self.text_field, self.fmt = path, text_field, file_format(path)
        self._raw: CountingFile | None = None
        self._done = 0

    @property
    def bytes_read(self) -> int:
        return self._done or (self._raw.pos if self._raw else 0)

    def __iter__(self) -> Iterator[Record]:
        with open(self.path, "rb") as f:
            self._raw = raw = CountingFile(f)
            if self.fmt == "parquet":
                yield from _parquet_docs(self.path, self.text_field, f)
            else:
                if self.fmt == "jsonl.zst":
                    chunks = _zstd_chunks(raw, self.path)
                elif self.fmt == "jsonl.gz":
                    chunks = _gzip_chunks(raw, self.path)
                else:
                    chunks = iter(lambda: raw.read(READ_CHUNK), b"")
                yield from _json_docs(_lines(chunks), self.path, self.text_field or "text")
            self._done = Path(self.path).stat().st_size
