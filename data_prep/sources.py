"""Parse `SOURCE=GLOB...` command-line arguments into {source: sorted file list}."""
from __future__ import annotations

import glob
import re

from data_prep.readers import DataError, file_format

_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def expand_sources(specs: list[str]) -> dict[str, list[str]]:
    """`pile=raw/pile/*.jsonl.zst` -> {"pile": [...]}.  A source may be given several times;
    its files are sorted so that file indices (and so shard names) are stable across runs."""
    out: dict[str, set[str]] = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not _NAME.match(name) or not pattern:
            raise DataError(f"bad source argument {spec!r}: expected NAME=GLOB with NAME of "
                            "letters, digits and _")
        files = glob.glob(pattern, recursive=True)
        if not files:
            raise DataError(f"source {name}: no file matches {pattern!r}")
        for f in files:
            file_format(f)  # fail now, not hours later, on a file we cannot read
        out.setdefault(name, set()).update(files)
    return {name: sorted(files) for name, files in out.items()}
