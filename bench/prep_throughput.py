"""Throughput of `data_prep shards` (read + encode + pack + write), in tokens/s per worker.

    python bench/prep_throughput.py [--raw data/sample/raw] [--tokenizer data/sample/tokenizer.model]
                                    [--copies 4] [--append bench/RESULTS.md]

Runs on the sample corpora (`make sample-data`), each input file repeated --copies times so
that the work dwarfs the worker start-up.  Also times sentencepiece alone on one core, the
ceiling for any pipeline around it.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from data_prep.readers import Doc, FileReader
from data_prep.shards import build_shards
from data_prep.sources import expand_sources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import append  # noqa: E402  (the project's RESULTS.md format)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--raw", default="data/sample/raw")
    p.add_argument("--tokenizer", default="data/sample/tokenizer.model")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--seq-lens", default="256,2048")
    p.add_argument("--workers", default="0,1,2", help="0: in this process, no start-up cost")
    p.add_argument("--no-append", action="store_true", help="print only, do not touch RESULTS.md")
    a = p.parse_args()
    raw = Path(a.raw)
    globs = {"pile": "pile/*.jsonl.zst", "c4": "c4/*.json.gz", "stack": "stack/data/*/*.parquet"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # enlarge the corpus: every file repeated, as separate input files (the unit of work)
        for src, pat in globs.items():
            for f in sorted(raw.glob(pat)):
                for c in range(a.copies):
                    dst = Path(tmp) / "raw" / src / f"{c}-{f.name}"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, dst)
        sources = expand_sources([f"{s}={tmp}/raw/{s}/*" for s in globs])
        raw_mb = sum(Path(f).stat().st_size for fs in sources.values() for f in fs) / 1e6

        # sentencepiece alone, one thread: tokens/s of encoding only
        sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
        docs = [r.text for fs in sources.values() for r in FileReader(fs[0]) if isinstance(r, Doc)]
        t = time.perf_counter()
        n = sum(map(len, sp.encode(docs, num_threads=1)))
        enc = n / (time.perf_counter() - t)
        rows.append(["sentencepiece encode only", "1 thread", "-", f"{n / 1e6:.2f}M",
                     f"{enc / 1e6:.2f}M", f"{enc / 1e6:.2f}M"])

        for seq in map(int, a.seq_lens.split(",")):
            for w in map(int, a.workers.split(",")):
                out = Path(tmp) / f"out-{seq}-{w}"
                t = time.perf_counter()
                man = build_shards(str(out), a.tokenizer, seq, sources, workers=w,
                                   shard_tokens=1 << 22, val_fraction=0.005)
                dt = time.perf_counter() - t
                tokens = sum(m["tokens"] + m["val_tokens"] + m["tokens_dropped"] for m in man.values())
                rows.append([f"shards --seq-len {seq}", w or "0 (in-process)", f"{raw_mb:.1f} MB",
                             f"{tokens / 1e6:.2f}M", f"{tokens / dt / 1e6:.2f}M",
                             f"{tokens / dt / max(w, 1) / 1e6:.2f}M"])
                print(rows[-1], flush=True)
                shutil.rmtree(out)
    header = ["what", "workers", "raw input", "tokens", "tokens/s", "tokens/s per worker"]
    notes = (f"sample corpora (stdlib docs and code) x{a.copies} copies, vocabulary "
             f"{sp.get_piece_size()}, wall time of build_shards incl. worker start-up")
    append("data_prep shards throughput", header, rows, notes, save=not a.no_append)


if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.WARNING)
    main()
