"""`python -m data_prep verify DIR [--full]`: the trainer's start-up check of shards
(retnet_train.data.verify), on a shard directory rather than a data config."""
from __future__ import annotations

import json
from pathlib import Path

from retnet_train.data.config import DataConfig, SourceConfig
from retnet_train.data.errors import DataError
from retnet_train.data.verify import verify_sources


def verify_dir(directory: str, full: bool = False, tokenizer: str | None = None,
               seq_len: int | None = None) -> str:
    """Verify every source under `directory` (a source directory, or one holding several);
    raises DataError on any problem, else returns a one-line summary."""
    d = Path(directory)
    dirs = [d] if (d / "manifest.json").exists() else sorted(p.parent for p in d.glob("*/manifest.json"))
    if not dirs:
        raise DataError(f"no manifest.json in {d} or its subdirectories")
    first = _raw_manifest(dirs[0])
    tok = tokenizer or first.get("tokenizer", {}).get("path")
    if not tok:
        raise DataError(f"{dirs[0] / 'manifest.json'}: no tokenizer path: pass --tokenizer")
    if not Path(tok).is_file():
        raise DataError(f"tokenizer {tok} (named in {dirs[0] / 'manifest.json'}) not found: "
                        "pass --tokenizer")
    # Validation batches are a training setting: a build without a held-out split is fine here.
    cfg = DataConfig(sources={p.name: SourceConfig(path=str(p)) for p in dirs}, tokenizer=tok,
                     val_batches=0)
    verify_sources(cfg, seq_len or int(first.get("window", 1)), full=full)
    return f"ok: {len(dirs)} source(s) in {d}" + (", sha256 of every shard checked" if full else "")


def _raw_manifest(d: Path) -> dict:
    try:
        return json.loads((d / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{d / 'manifest.json'}: unreadable: {e}") from e
