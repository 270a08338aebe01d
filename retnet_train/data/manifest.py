"""manifest.json: what a source directory of shards holds (written by data_prep shards)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from retnet_train.data.errors import DataError

MANIFEST_FORMAT = "retnet_train-shards-v1"


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Shard:
    path: Path      # absolute
    samples: int    # windows in the shard
    # None in manifests of a data_prep from before they were recorded
    bytes: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    dir: Path
    source: str
    window: int
    dtype: str
    tokenizer_sha256: str
    n_pieces: int   # token ids must be below this (vocab_size is padded past it)
    vocab_size: int
    bos_id: int
    pad_id: int
    shards: tuple[Shard, ...]
    val_shards: tuple[Shard, ...]
    raw: dict


def load_manifest(directory: str | Path) -> Manifest:
    d = Path(directory)
    path = d / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {d} (build it with `python -m data_prep "
                                "shards` or `make sample-data`)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from e
    if m.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: key 'format' is {m.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if m.get("error"):  # a build that finished but must not be trained on (e.g. no document)
        raise DataError(f"{path}: key 'complete' is false: {m['error']}")
    if not m.get("complete"):
        raise DataError(f"{path}: key 'complete' is false: the shard build did not finish; "
                        "rerun the same `data_prep shards` command to complete it")
    try:
        def shards(key):
            return tuple(Shard(d / s["path"], int(s["samples"]), s.get("bytes"), s.get("sha256"))
                         for s in m[key] if s["samples"] > 0)
        tok = m["tokenizer"]
        return Manifest(d, m["source"], int(m["window"]), m["dtype"], tok["sha256"],
                        int(tok["n_pieces"]), int(tok["vocab_size"]), int(tok["bos_id"]),
                        int(tok["pad_id"]), shards("shards"), shards("val_shards"), m)
    except KeyError as e:
        raise DataError(f"{path}: missing key {e.args[0]!r}") from e
