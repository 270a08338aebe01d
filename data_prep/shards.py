"""`python -m data_prep shards`: encode every input file in worker processes, pack it into
windows and write webdataset shards plus a manifest.json per source.

The unit of work is one input file: its shards are named after it (`<source>-FFFFF-NNNN.tar`),
so workers never coordinate, the output does not depend on --workers, and an interrupted
build continues file by file.  A finished file leaves `parts/FFFFF.json`; the manifest is
rebuilt from those records after each file, so it never lists an incomplete shard.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import zlib
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from data_prep.pack import Packer, ShardWriter, shard_checksum
from retnet_train.progress import Bar
from data_prep.readers import DataError, FileReader, Skip
from retnet_train.data.manifest import MANIFEST_FORMAT, write_json_atomic
from retnet_train.data.tokenizer import load_tokenizer

log = logging.getLogger("data_prep.shards")
ENCODE_BATCH = 256      # documents per sentencepiece call
MAX_SKIPS_LISTED = 1000  # per source in the manifest; the count is always exact
MAX_SKIPS_LOGGED = 20    # per file


@dataclass(frozen=True)
class FileTask:
    source: str
    index: int
    path: str
    out: str            # the source's output directory
    window: int
    shard_windows: int
    val_fraction: float
    text_field: str | None
    strict: bool
    dtype: str
    pad_id: int


# Per worker process: the tokenizer and shared progress counters (docs, tokens, bytes).
_sp = None
_counters = None


def _init_worker(tokenizer: str, counters) -> None:
    global _sp, _counters
    _sp, _ = load_tokenizer(tokenizer)
    _counters = counters


def _is_val(path: str, line: int, fraction: float) -> bool:
    # Held-out documents are picked by a hash of (file name, line): stable across reruns and
    # machines, and independent of everything else in the build.
    return zlib.crc32(f"{Path(path).name}:{line}".encode()) % 1_000_000 < fraction * 1_000_000


def _encode(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    ids = _sp.encode(texts, add_bos=True, add_eos=True, num_threads=1)
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(chain.from_iterable(ids), dtype, int(lens.sum())), lens


def build_file(task: FileTask) -> dict:
    out = Path(task.out)
    prefix = f"{task.source}-{task.index:05d}"
    train = Packer(task.window, task.dtype, task.pad_id, ShardWriter(out / "train", prefix, task.shard_windows))
    val = Packer(task.window, task.dtype, task.pad_id, ShardWriter(out / "val", prefix, task.shard_windows))
    reader = FileReader(task.path, task.text_field)
    skipped: list[dict] = []
    n_skipped = docs = val_docs = 0
    batches = {id(train): [], id(val): []}
    last_bytes = 0

    def flush(packer: Packer) -> None:
        nonlocal last_bytes
        texts = batches[id(packer)]
        if not texts:
            return
        tokens, lens = _encode(texts, task.dtype)
        packer.add(tokens, lens)
        texts.clear()
        if _counters is not None:
            with _counters.get_lock():
                _counters[0] += len(lens)
                _counters[1] += int(lens.sum())
                _counters[2] += reader.bytes_read - last_bytes
            last_bytes = reader.bytes_read

    for rec in reader:
        if isinstance(rec, Skip):
            where = f"{rec.file}:{rec.line}: {rec.reason}"
            if task.strict:
                raise DataError(f"{where} (--strict)")
            if n_skipped < MAX_SKIPS_LOGGED:
                log.warning("skipped record %s", where)
            n_skipped += 1
            if len(skipped) < MAX_SKIPS_LISTED:
                skipped.append(asdict(rec))
            continue
        target = val if _is_val(task.path, rec.line, task.val_fraction) else train
        docs += 1
        val_docs += target is val
        batches[id(target)].append(rec.text)
        if len(batches[id(target)]) >= ENCODE_BATCH:
            flush(target)
    flush(train)
    flush(val)
    if n_skipped > MAX_SKIPS_LOGGED:
        log.warning("%s: %d records skipped in all (the first %d are logged above; the manifest "
                    "lists up to %d)", task.path, n_skipped, MAX_SKIPS_LOGGED, MAX_SKIPS_LISTED)
    if docs == 0:  # fatal only if the whole source is empty (see _no_documents); said here too
        log.warning("%s: no document in this file (%d records skipped)", task.path, n_skipped)
    train_shards, dropped = train.finish()
    val_shards, val_dropped = val.finish()
    if _counters is not None:
        with _counters.get_lock():
            _counters[2] += Path(task.path).stat().st_size - last_bytes
    return {"source": task.source, "file": task.path, "index": task.index,
            "bytes": Path(task.path).stat().st_size,
            "documents": docs, "val_documents": val_docs, "tokens": train.tokens,
            "val_tokens": val.tokens, "tokens_dropped": dropped + val_dropped,
            "skipped_count": n_skipped, "skipped": skipped,
            "shards": train_shards, "val_shards": val_shards}


def _check_fingerprint(out: Path, fingerprint: dict) -> None:
    path = out / "build.json"
    if path.exists():
        old = json.loads(path.read_text())
        for key in sorted(set(old) | set(fingerprint)):
            if old.get(key) != fingerprint.get(key):
                raise DataError(f"{out} holds a build made with other arguments ({key}: "
                                f"{old.get(key)!r} then, {fingerprint.get(key)!r} now); "
                                "use another --out or delete it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, fingerprint)


def _add_missing_checksums(rec: dict, src_dir: Path) -> bool:
    """A finished file's record from a data_prep that did not record shard checksums: hash
    its shards now, so rerunning the build command upgrades the manifest without encoding
    anything again.  Returns whether the record changed."""
    old = [x for x in rec["shards"] + rec["val_shards"] if "sha256" not in x]
    for x in old:
        x.update(shard_checksum(src_dir / x["path"]))
    return bool(old)


def _no_documents(source: str, parts: list[dict], skipped: list[dict]) -> str:
    """Why a finished source has no document, for the error and the manifest's `error` key."""
    n_skipped = sum(p["skipped_count"] for p in parts)
    if n_skipped:
        first = "; ".join(f"{x['file']}:{x['line']}: {x['reason']}" for x in skipped[:3])
        why = f"all {n_skipped} records were skipped, the first: {first}"
    else:
        why = "the files hold no record at all (empty?)"
    files = ", ".join(p["file"] for p in parts[:3])
    files += f" and {len(parts) - 3} more" if len(parts) > 3 else ""
    return (f"source {source}: no document in its {len(parts)} input file(s) ({files}): {why}; "
            "check the glob and --text-field")


def _write_manifest(src_dir: Path, source: str, n_files: int, common: dict,
                    done: dict[int, dict]) -> dict:
    """manifest.json from the records of the finished input files (`done`: index -> record).
    A finished source without a single document gets `complete: false` and an `error`: the
    trainer must refuse it, not train on the other sources as if it were fine."""
    parts = [done[i] for i in sorted(done)]
    skipped = list(chain.from_iterable(p["skipped"] for p in parts))[:MAX_SKIPS_LISTED]
    documents = sum(p["documents"] for p in parts)
    finished = len(parts) == n_files
    error = _no_documents(source, parts, skipped) if finished and documents == 0 else None
    man = {"format": MANIFEST_FORMAT, "source": source, "complete": finished and error is None,
           **({"error": error} if error else {}),
           **common,
           "documents": documents,
           "val_documents": sum(p["val_documents"] for p in parts),
           "tokens": sum(p["tokens"] for p in parts),
           "val_tokens": sum(p["val_tokens"] for p in parts),
           "tokens_dropped": sum(p["tokens_dropped"] for p in parts),
           "skipped_count": sum(p["skipped_count"] for p in parts), "skipped": skipped,
           "inputs": [{k: p[k] for k in ("file", "bytes", "documents", "skipped_count")} for p in parts],
           "shards": list(chain.from_iterable(p["shards"] for p in parts)),
           "val_shards": list(chain.from_iterable(p["val_shards"] for p in parts))}
    write_json_atomic(src_dir / "manifest.json", man)
    return man


def build_shards(out: str, tokenizer: str, window: int, sources: dict[str, list[str]], *,
                 workers: int = 1, shard_tokens: int = 1 << 24, val_fraction: float = 0.005,
                 text_field: str | None = None, strict: bool = False) -> dict[str, dict]:
    """Build (or continue building) shards for every source; returns the manifests.
    workers=0 encodes in this process (tests, debugging).  A source that yields no document
    is a DataError naming it (raised once every source is built)."""
    if window < 2:
        raise DataError(f"--seq-len must be at least 2, got {window}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < window:
        raise DataError(f"--shard-tokens must be at least --seq-len ({window}: one window a shard), "
                        f"got {shard_tokens}")
    if workers < 0:
        raise DataError(f"--workers must be >= 0 (0: encode in this process), got {workers}")
    _, tok = load_tokenizer(tokenizer)
    out_dir = Path(out)
    shard_windows = max(1, shard_tokens // window)
    fingerprint = {"tokenizer_sha256": tok.sha256, "window": window, "shard_windows": shard_windows,
                   "val_fraction": val_fraction, "text_field": text_field,
                   "sources": {s: [[f, os.path.getsize(f)] for f in fs] for s, fs in sources.items()}}
    _check_fingerprint(out_dir, fingerprint)
    common = {"tokenizer": {"path": str(tokenizer), "sha256": tok.sha256, "n_pieces": tok.n_pieces,
                            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                            "eos_id": tok.eos_id, "pad_id": tok.pad_id},
              "window": window, "stored_window": window + 1, "dtype": tok.dtype,
              "val_fraction": val_fraction}
    tasks, total_bytes = [], 0
    done: dict[str, dict[int, dict]] = {}  # source -> file index -> record of a finished file
    for source, files in sources.items():
        src_dir = out_dir / source
        (src_dir / "parts").mkdir(parents=True, exist_ok=True)
        for stale in chain(src_dir.glob("*/*.tmp*"), src_dir.glob("parts/*.tmp*")):
            stale.unlink()  # left by a killed run; never listed anywhere
        done[source] = {}
        for i, f in enumerate(files):
            part = src_dir / "parts" / f"{i:05d}.json"
            if part.exists():
                rec = json.loads(part.read_text())
                if _add_missing_checksums(rec, src_dir):
                    write_json_atomic(part, rec)
                done[source][i] = rec
            else:
                tasks.append(FileTask(source, i, f, str(src_dir), window, shard_windows,
                                      val_fraction, text_field, strict, tok.dtype, tok.pad_id))
                total_bytes += os.path.getsize(f)
        _write_manifest(src_dir, source, len(files), common, done[source])
    log.info("%d input files to encode (%d already done), %d workers", len(tasks),
             sum(map(len, done.values())), workers)

    # No fork of a process that may hold threads or open files: spawn, for the pool and for
    # the shared counters alike.
    ctx = mp.get_context("spawn")
    counters = ctx.Array("q", 3)
    # The counters live in the workers (docs, tokens, input bytes read): the bar follows the
    # bytes, since the input size is what is known in advance.
    progress = Bar("encoding", total=total_bytes, unit="B")

    def report() -> None:
        docs, tokens, done_bytes = counters[:]
        progress.note(f"{docs} docs, {tokens / 1e6:.1f}M tokens")
        progress.set(done_bytes)

    def finished(rec: dict, task: FileTask) -> None:
        write_json_atomic(Path(task.out) / "parts" / f"{task.index:05d}.json", rec)
        done[task.source][task.index] = rec
        _write_manifest(Path(task.out), task.source, len(sources[task.source]), common,
                        done[task.source])

    by_key = {(t.source, t.index): t for t in tasks}
    if workers == 0:
        _init_worker(tokenizer, counters)
        for t in tasks:
            finished(build_file(t), t)
            report()
    else:
        # Largest files first, so that no worker starts a big file when the others are
        # finishing.  (The output does not depend on the order.)
        tasks.sort(key=lambda t: -os.path.getsize(t.path))
        with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, counters)) as pool:
            results = pool.imap_unordered(build_file, tasks)
            remaining = len(tasks)
            while remaining:
                try:
                    rec = results.next(timeout=1.0)
                except mp.TimeoutError:
                    report()
                    continue
                finished(rec, by_key[(rec["source"], rec["index"])])
                remaining -= 1
    report()
    progress.close()
    manifests = {s: _write_manifest(out_dir / s, s, len(fs), common, done[s])
                 for s, fs in sources.items()}
    for s, m in manifests.items():
        log.info("%s: %d documents, %d train windows in %d shards (%.1fM tokens), %d val windows, "
                 "%d records skipped", s, m["documents"], sum(x["samples"] for x in m["shards"]),
                 len(m["shards"]), m["tokens"] / 1e6, sum(x["samples"] for x in m["val_shards"]),
                 m["skipped_count"])
    errors = [m["error"] for m in manifests.values() if "error" in m]
    if errors:  # after building every other source: one rerun fixes all of them
        raise DataError("\n".join(errors))
    return manifests
