"""Tiny raw corpora in the real layouts, a tokenizer and shards, built once per test session.

Imported by tests/test_data*.py and tests/test_prep*.py (`from data_fixtures import ...`).
Built with a module-level cache, not only a session fixture: a fixture imported into
several modules would otherwise be built once per module.
"""
from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from retnet_train.data import DataConfig, SourceConfig

WINDOW = 32          # tokens per stored window (tiny, so a few KB make many windows)
SHARD_WINDOWS = 12   # windows per shard: several shards per file, uneven across sources
VOCAB = 400          # not a multiple of 128 on purpose: the model vocabulary pads to 512


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(n)]


def prose(rng: random.Random, words: list[str], i: int) -> str:
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + "."
                 for _ in range(rng.randint(2, 12))]
    return f"Document {i}. " + " ".join(sentences)


def texts_for(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = _words(rng, 100)
    return [prose(rng, words, i) for i in range(n)]


def code(rng: random.Random, words: list[str], i: int) -> str:
    lines = [f"def {rng.choice(words)}_{i}(x, y):"]
    for _ in range(rng.randint(2, 10)):
        lines.append(f"    {rng.choice(words)} = x * {rng.randint(0, 999)} + y  # {rng.choice(words)}")
    lines.append("    if x:\n        return x\n    return None\n")
    return "\n".join(lines)


def write_zst_jsonl(path: Path, records: list, *, raw_lines: list[bytes] = ()) -> None:
    """JSON lines in one zstd frame with a 2 GiB window, as `zstd --long=31` makes them
    (streamed, so the frame keeps its full window size: the reader must allow it)."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records) + b"".join(raw_lines)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, zstandard.ZstdCompressor(compression_params=params).stream_writer(f) as w:
        w.write(data)


def write_c4(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            ts = "2019-04-25T12:57:54Z" if i % 2 else 1556197074  # both kinds occur in C4
            f.write(json.dumps({"text": t, "timestamp": ts, "url": f"https://example.com/{i}"}) + "\n")


def write_stack(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "content": texts, "lang": ["Python"] * len(texts),
        "max_stars_repo_path": [f"src/m{i}.py" for i in range(len(texts))],
        "max_stars_repo_name": ["org/repo"] * len(texts),
        "size": [len(t) for t in texts], "ext": ["py"] * len(texts),
        "hexsha": [f"{i:040x}" for i in range(len(texts))]}), path, row_group_size=16)


@dataclass
class Corpus:
    root: Path
    docs: dict[str, list[str]]          # source -> documents in file order
    files: dict[str, list[str]]         # source -> files (sorted, as data_prep sees them)

    def specs(self) -> list[str]:
        return [f"{s}={self.root}/{pat}" for s, pat in
                (("pile", "pile/*.jsonl.zst"), ("c4", "c4/c4-*.json.gz"),
                 ("stack", "stack/data/*/*.parquet"))]


def write_corpus(root: Path, seed: int = 0, scale: int = 1) -> Corpus:
    rng = random.Random(seed)
    words = _words(rng, 300)
    pile = [[prose(rng, words, i) for i in range(k, k + 40 * scale)] for k in (0, 1000)]
    c4 = [prose(rng, words, i) for i in range(2000, 2000 + 50 * scale)]
    stack = [[code(rng, words, i) for i in range(k, k + 30 * scale)] for k in (3000, 4000)]
    for k, docs in enumerate(pile):
        write_zst_jsonl(root / "pile" / f"{k:02d}.jsonl.zst",
                        [{"text": t, "meta": {"pile_set_name": "Pile-CC"}} for t in docs])
    write_c4(root / "c4" / "c4-train.00000-of-00001.json.gz", c4)
    for k, docs in enumerate(stack):
        write_stack(root / "stack" / "data" / "python" / f"train-{k:05d}-of-00002.parquet", docs)
    return Corpus(root, {"pile": pile[0] + pile[1], "c4": c4, "stack": stack[0] + stack[1]},
                  {"pile": sorted(str(p) for p in (root / "pile").glob("*")),
                   "c4": [str(root / "c4" / "c4-train.00000-of-00001.json.gz")],
                   "stack": sorted(str(p) for p in (root / "stack/data/python").glob("*"))})


@dataclass
class Built:
    corpus: Corpus
    tokenizer: str
    shards: Path
    manifests: dict

    def cfg(self, weights=(0.5, 0.3, 0.2), **kw) -> DataConfig:
        return DataConfig(sources={s: SourceConfig(path=str(self.shards / s), weight=w)
                                   for s, w in zip(("pile", "c4", "stack"), weights)},
                          tokenizer=self.tokenizer, **kw)


_cache: dict = {}


def build(root: Path) -> Built:
    from data_prep.shards import build_shards
    from data_prep.sources import expand_sources
    from data_prep.tokenizer import train_tokenizer
    corpus = write_corpus(root / "raw")
    sources = expand_sources(corpus.specs())
    tok = str(root / "tok.model")
    train_tokenizer(tok, VOCAB, sources, threads=1)
    manifests = build_shards(str(root / "shards"), tok, WINDOW, sources, workers=0,
                             shard_tokens=WINDOW * SHARD_WINDOWS, val_fraction=0.15)
    return Built(corpus, tok, root / "shards", manifests)


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    if "built" not in _cache:
        _cache["built"] = build(tmp_path_factory.mktemp("data"))
    return _cache["built"]
