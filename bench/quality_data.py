"""The data of bench/quality.py's GPU pair (data=quality): built on a CPU machine, carried to a GPU
machine that has no network as one archive, unpacked there with Python and zstandard alone.

    python bench/quality_data.py            # here: data/quality/ and data/quality.tar.zst (~4 min on 2 cores)
    python bench/quality_data.py --unpack   # there: data/quality.tar.zst -> data/quality/

The corpus is `make sample-data`'s (Python stdlib docstrings and pydoc topics as Pile/C4-style prose,
stdlib source as Stack-style code) plus the installed packages of the interpreter that runs this
(`python -m data_prep sample --site-packages`: docstrings to pile/c4, source files to stack, in the
sample mixture's 0.5/0.3/0.2 proportions), encoded with data/sample/tokenizer.model (vocab 4096)
into 1024-token windows; 4% of the documents are held out. Nothing is downloaded.

Measured (2026-11-28, this repo's .venv: Python 3.11.7 with torch, transformers, sympy, scipy, ...):
    raw           pile 6,492 docs 26.4 MB, c4 4,175 docs 16.6 MB, stack 823 files 12.7 MB (chars)
    train tokens  pile 8,908,800, c4 5,524,480, stack 4,072,448 = 18,505,728 (565 steps of 32,768)
    val tokens    pile 366,592, c4 234,496, stack 160,768 (>= 157 windows of 1024 per source)
    archive       data/quality.tar.zst 12.4 MiB (13.0 MB; the shards unpack to 74 MiB)
    time          4 minutes on 2 busy cores (1m45 reading site-packages, 30 s encoding); unpack 1 s
Another set of installed packages gives another corpus: the archive, not this script, is what
travels, and quality.py records the token counts it trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
DATA = Path("data/quality")            # relative to the repo, as conf/data/quality.yaml reads it
ARCHIVE = Path("data/quality.tar.zst")
SITE_PACKAGES_MB = 60                  # an upper bound: this .venv's packages give ~51 MB in all
SEQ_LEN = 1024                         # long windows: tar headers per window matter little
VAL_FRACTION = 0.04                    # >= 128 validation windows per source (4 eval batches of 32)
SOURCES = {"pile": "raw/pile/*.jsonl.zst", "c4": "raw/c4/*.json.gz", "stack": "raw/stack/data/*/*.parquet"}


def build() -> dict:
    tokenizer = Path("data/sample/tokenizer.model")
    if not tokenizer.is_file():
        raise SystemExit(f"{tokenizer} is missing: run `make sample-data` first (its tokenizer is reused)")
    raw = DATA / "raw"
    if not (raw / ".complete").is_file():
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(DATA / "shards", ignore_errors=True)  # built from the old raw files
        from data_prep.sample import write_sample

        stats = write_sample(str(raw), SITE_PACKAGES_MB)
        (raw / "stats.json").write_text(json.dumps(stats, indent=1))
        (raw / ".complete").touch()
    stats = json.loads((raw / "stats.json").read_text())
    shutil.copyfile(tokenizer, DATA / "tokenizer.model")  # the archive carries its own tokenizer
    subprocess.run([sys.executable, "-m", "data_prep", "shards", "--tokenizer", str(DATA / "tokenizer.model"),
                    "--seq-len", str(SEQ_LEN), "--out", str(DATA / "shards"), "--workers", "2",
                    "--val-fraction", str(VAL_FRACTION),
                    *[f"{s}={DATA / g}" for s, g in SOURCES.items()]], check=True)
    corpus = {"description": (f"Python {sys.version.split()[0]} stdlib docstrings, pydoc topics and source plus "
                              f"the installed packages' docstrings (pile, c4) and source files (stack), "
                              f"tokenizer vocab 4096, {SEQ_LEN}-token windows"),
              "raw": stats, "sources": {}}
    for s in SOURCES:
        m = json.loads((DATA / "shards" / s / "manifest.json").read_text())
        corpus["sources"][s] = {k: m[k] for k in ("tokens", "val_tokens", "documents", "val_documents")}
    (DATA / "corpus.json").write_text(json.dumps(corpus, indent=1) + "\n")
    return corpus


def pack() -> None:
    """tokenizer, corpus.json and shards/ (not raw/) in sorted order with fixed owners and times,
    so the same data gives the same archive."""
    members = [DATA / "tokenizer.model", DATA / "corpus.json"]
    members += sorted(p for p in (DATA / "shards").rglob("*") if p.is_file())

    def fixed(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
        return info

    tmp = ARCHIVE.with_suffix(".tmp")
    # level 10 with long-distance matching: 12 MiB in ~1 s; level 19 saves 2 MiB for 30 s more
    params = zstandard.ZstdCompressionParameters.from_level(10, window_log=27, enable_ldm=True, threads=2)
    with open(tmp, "wb") as f, zstandard.ZstdCompressor(compression_params=params).stream_writer(f) as w:
        with tarfile.open(fileobj=w, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for p in members:
                tar.add(p, arcname=str(p.relative_to(DATA.parent)), recursive=False, filter=fixed)
    os.replace(tmp, ARCHIVE)


def unpack() -> None:
    if not ARCHIVE.is_file():
        raise SystemExit(f"{ARCHIVE} is missing: build it with `python bench/quality_data.py` and carry it")
    shutil.rmtree(DATA / "shards", ignore_errors=True)  # a stale shard would fail the manifest check
    # the frame's window (2^27) is within the decompressor's default limit
    with open(ARCHIVE, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        with tarfile.open(fileobj=r, mode="r|") as tar:
            tar.extractall(DATA.parent, filter="data")
    try:
        import sentencepiece  # noqa: F401  (the trainer reads the tokenizer's vocabulary and sha256)
    except ImportError:
        print("warning: sentencepiece is not importable; the trainer needs it to read data/quality/tokenizer.model")


def summary() -> str:
    c = json.loads((DATA / "corpus.json").read_text())
    src = c["sources"]
    train = sum(v["tokens"] for v in src.values())
    lines = [c["description"],
             "train tokens " + ", ".join(f"{s} {v['tokens']:,}" for s, v in src.items()) + f" = {train:,}",
             "val tokens   " + ", ".join(f"{s} {v['val_tokens']:,}" for s, v in src.items())]
    if ARCHIVE.is_file():
        lines.append(f"archive {ARCHIVE} {ARCHIVE.stat().st_size / 2**20:.1f} MiB")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unpack", action="store_true", help="extract data/quality.tar.zst into data/quality/")
    args = p.parse_args(argv)
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    if args.unpack:
        unpack()
    else:
        DATA.mkdir(parents=True, exist_ok=True)
        build()
        pack()
    print(summary())


if __name__ == "__main__":
    main()
