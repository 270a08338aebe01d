"""`python -m data_prep sample OUT_DIR`: small raw corpora in the three real layouts, made
from text every Python installation carries (nothing downloaded, no corpus text committed):

  OUT/pile/*.jsonl.zst                 docstrings of half the stdlib modules (Pile style)
  OUT/c4/c4-train.*-of-*.json.gz       the other half + pydoc topic pages (C4 style)
  OUT/stack/data/python/*.parquet      the stdlib's own source files (the Stack's columns)
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import os
import sysconfig
from pathlib import Path

import zstandard

log = logging.getLogger("data_prep.sample")
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
STACK_BYTES = 2_500_000   # code budget; the docstrings add about 2 MB of prose
FILES_PER_SOURCE = 2      # >1 so that `shards --workers 2` has work for both workers


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        out += [Path(d) / f for f in sorted(files) if f.endswith(".py")]
    return out


def _docstring_doc(path: Path, src: str) -> str | None:
    """One document per module: its docstrings under their qualified names."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                title = path.stem if isinstance(node, ast.Module) else node.name
                parts.append(f"{title}\n\n{doc}")
    return "\n\n".join(parts) if parts else None


def _pages(text: str, size: int = 3000) -> list[str]:
    """Cut a long help topic into web-page-sized documents at paragraph breaks."""
    pages, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) > size:
            pages.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    return pages + [cur] if cur else pages


def _split(items: list, n: int) -> list[list]:
    return [items[i::n] for i in range(n)]


def write_sample(out_dir: str) -> None:
    out = Path(out_dir)
    from pydoc_data.topics import topics
    root = Path(sysconfig.get_paths()["stdlib"])
    pile, c4, stack, stack_bytes = [], [], [], 0
    for i, path in enumerate(_stdlib_files()):
        src = path.read_text(encoding="utf-8", errors="replace")
        doc = _docstring_doc(path, src)
        if doc:
            (pile if i % 2 == 0 else c4).append((path, doc))
        if stack_bytes < STACK_BYTES and len(src) < 40_000:  # many small files, not a few huge
            stack.append((path, src))
            stack_bytes += len(src)
    c4_docs = [(f"topics/{name}", page) for name, body in sorted(topics.items())
               for page in _pages(body)]
    c4_docs += [(str(p.relative_to(root)), d) for p, d in c4]

    # Pile: zstd with a long window, as `zstd --long=31` writes (the reader must accept it).
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)
    (out / "pile").mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(_split(pile, FILES_PER_SOURCE)):
        lines = b"".join(json.dumps({"text": d, "meta": {"pile_set_name": "StdlibDocs"}}).encode()
                         + b"\n" for _, d in part)
        with open(out / "pile" / f"{k:02d}.jsonl.zst", "wb") as f:
            with zstandard.ZstdCompressor(compression_params=params).stream_writer(f) as w:
                w.write(lines)

    # C4: gzip JSON lines; the timestamp comes as a string in some dumps, a number in others.
    (out / "c4").mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(_split(c4_docs, FILES_PER_SOURCE)):
        name = out / "c4" / f"c4-train.{k:05d}-of-{FILES_PER_SOURCE:05d}.json.gz"
        with gzip.open(name, "wt", encoding="utf-8") as f:
            for j, (where, text) in enumerate(part):
                ts = "2019-04-25T12:57:54Z" if j % 2 else 1556197074
                f.write(json.dumps({"text": text, "timestamp": ts,
                                    "url": f"https://docs.python.org/3/{where}"}) + "\n")

    # The Stack: parquet under data/<lang>/ with its column names.
    import pyarrow as pa
    import pyarrow.parquet as pq
    (out / "stack" / "data" / "python").mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(_split(stack, FILES_PER_SOURCE)):
        rows = {"content": [s for _, s in part], "lang": ["Python"] * len(part),
                "max_stars_repo_path": [str(p.relative_to(root)) for p, _ in part],
                "max_stars_repo_name": ["python/cpython"] * len(part),
                "size": [len(s.encode()) for _, s in part],
                "ext": ["py"] * len(part),
                "hexsha": [hashlib.sha1(s.encode()).hexdigest() for _, s in part]}
        pq.write_table(pa.table(rows), out / "stack" / "data" / "python" /
                       f"train-{k:05d}-of-{FILES_PER_SOURCE:05d}.parquet", row_group_size=256)
    log.info("sample corpora in %s: pile %d docs, c4 %d docs, stack %d files (%.1f MB code)",
             out, len(pile), len(c4_docs), len(stack), stack_bytes / 1e6)
