"""`python -m data_prep sample OUT_DIR [--site-packages MB]`: small raw corpora in the three real
layouts, made from text every Python installation carries (nothing downloaded, no corpus text
committed):

  OUT/pile/*.jsonl.zst                 docstrings of half the stdlib modules (Pile style)
  OUT/c4/c4-train.*-of-*.json.gz       the other half + pydoc topic pages (C4 style)
  OUT/stack/data/python/*.parquet      the stdlib's own source files (the Stack's columns)

`--site-packages MB` adds up to MB megabytes (of text written) drawn from the running
interpreter's installed packages, in sorted path order: a file gives either its source (to
stack) or its docstrings (to pile or c4), never both, so no text sits in two sources (one
source's validation text cannot be another's training text). The default output is unchanged.
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

# site-packages: shares of the text written, after conf/data/sample.yaml's weights (pile 0.5,
# c4 0.3, stack 0.2), so that one pass over the tokens sees each source about once.
SITE_SHARES = {"pile": 0.5, "c4": 0.3, "stack": 0.2}
SITE_SKIP_DIRS = {"test", "tests", "testing", "idle_test", "__pycache__"}
SITE_MAX_FILE = 400_000    # chars; larger files are generated tables (unicode data, lexers), not prose
SITE_MAX_STACK = 100_000   # chars; as for the stdlib: many ordinary files rather than a few huge ones
SITE_FILES_PER_SOURCE = 4  # a few MB per file: the unit of work of `shards --workers`


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        out += [Path(d) / f for f in sorted(files) if f.endswith(".py")]
    return out


def _site_files() -> list[tuple[Path, Path]]:
    """(site root, file) for every .py file of the installed packages, in sorted order."""
    paths = sysconfig.get_paths()
    out = []
    for root in sorted({Path(paths[k]).resolve() for k in ("purelib", "platlib")}):
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in SITE_SKIP_DIRS)
            out += [(root, Path(d) / f) for f in sorted(files) if f.endswith(".py")]
    return out


def _docstring_doc(path: Path, src: str, seen: set | None = None) -> str | None:
    """One document per module: its docstrings under their qualified names. With `seen`, a
    docstring already taken (another copy of a vendored module, an argument list repeated in
    every model class) is left out."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and seen is not None:
                key = hashlib.sha1(doc.encode("utf-8", "replace")).digest()
                doc = None if key in seen else doc
                seen.add(key)
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


def _site_packages(budget: int, seen_files: set) -> dict[str, list[tuple[str, str, str]]]:
    """Up to `budget` chars of (package, path, text) per source from the installed packages.
    Each file goes to the source furthest below its share of what is written so far."""
    out = {name: [] for name in SITE_SHARES}
    done = dict.fromkeys(SITE_SHARES, 0)
    seen_docs: set = set()
    for root, path in _site_files():
        total = sum(done.values())
        if total >= budget:
            break
        try:
            src = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        key = hashlib.sha1(src.encode("utf-8", "replace")).digest()
        if len(src) > SITE_MAX_FILE or key in seen_files:  # vendored copies appear more than once
            continue
        seen_files.add(key)
        rel = str(path.relative_to(root))
        package = rel.split(os.sep)[0].removesuffix(".py")
        want = min(SITE_SHARES, key=lambda s: done[s] / SITE_SHARES[s])
        if want == "stack":
            if len(src) <= SITE_MAX_STACK:
                out["stack"].append((package, rel, src))
                done["stack"] += len(src)
            continue
        doc = _docstring_doc(path, src, seen_docs)
        if doc:
            out[want].append((package, rel, doc))
            done[want] += len(doc)
    log.info("site-packages: %s", ", ".join(f"{s} {len(v)} files {done[s] / 1e6:.1f} MB"
                                           for s, v in out.items()))
    return out


def write_sample(out_dir: str, site_packages_mb: float = 0) -> dict[str, dict[str, int]]:
    """Write the corpora; returns {source: {"documents": n, "chars": n}}."""
    out = Path(out_dir)
    from pydoc_data.topics import topics
    root = Path(sysconfig.get_paths()["stdlib"])
    pile, c4, stack, stack_bytes = [], [], [], 0
    seen_files = set()
    for i, path in enumerate(_stdlib_files()):
        src = path.read_text(encoding="utf-8", errors="replace")
        seen_files.add(hashlib.sha1(src.encode("utf-8", "replace")).digest())
        doc = _docstring_doc(path, src)
        if doc:
            (pile if i % 2 == 0 else c4).append((path, doc))
        if stack_bytes < STACK_BYTES and len(src) < 40_000:  # many small files, not a few huge
            stack.append((path, src))
            stack_bytes += len(src)
    # From here on a document is (repository, path, text): stdlib ones under python/cpython.
    pile_docs = [("python/cpython", str(p.relative_to(root)), d) for p, d in pile]
    c4_docs = [("python/cpython", f"topics/{name}", page) for name, body in sorted(topics.items())
               for page in _pages(body)]
    c4_docs += [("python/cpython", str(p.relative_to(root)), d) for p, d in c4]
    stack_docs = [("python/cpython", str(p.relative_to(root)), s) for p, s in stack]
    n_files = FILES_PER_SOURCE
    if site_packages_mb > 0:
        site = _site_packages(int(site_packages_mb * 1e6), seen_files)
        pile_docs += site["pile"]
        c4_docs += site["c4"]
        stack_docs += site["stack"]
        n_files = SITE_FILES_PER_SOURCE

    # Pile: zstd with a long window, as `zstd --long=31` writes (the reader must accept it).
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)
    (out / "pile").mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(_split(pile_docs, n_files)):
        lines = b"".join(json.dumps({"text": d, "meta": {"pile_set_name": "StdlibDocs" if r == "python/cpython"
                                                          else "PackageDocs"}}).encode()
                         + b"\n" for r, _, d in part)
        with open(out / "pile" / f"{k:02d}.jsonl.zst", "wb") as f:
            with zstandard.ZstdCompressor(compression_params=params).stream_writer(f) as w:
                w.write(lines)

    # C4: gzip JSON lines; the timestamp comes as a string in some dumps, a number in others.
    (out / "c4").mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(_split(c4_docs, n_files)):
        name = out / "c4" / f"c4-train.{k:05d}-of-{n_files:05d}.json.gz"
        with gzip.open(name, "wt", encoding="utf-8") as f:
            for j, (repo, where, text) in enumerate(part):
                ts = "2019-04-25T12:57:54Z" if j % 2 else 1556197074
                url = (f"https://docs.python.org/3/{where}" if repo == "python/cpython"
                       else f"file:///site-packages/{where}")
                f.write(json.dumps({"text": text, "timestamp": ts, "url": url}) + "\n")

    # The Stack: parquet under data/<lang>/ with its column names.
    import pyarrow as pa
    import pyarrow.parquet as pq
    (out / "stack" / "data" / "python").mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(_split(stack_docs, n_files)):
        rows = {"content": [s for _, _, s in part], "lang": ["Python"] * len(part),
                "max_stars_repo_path": [p for _, p, _ in part],
                "max_stars_repo_name": [r for r, _, _ in part],
                "size": [len(s.encode()) for _, _, s in part],
                "ext": ["py"] * len(part),
                "hexsha": [hashlib.sha1(s.encode()).hexdigest() for _, _, s in part]}
        pq.write_table(pa.table(rows), out / "stack" / "data" / "python" /
                       f"train-{k:05d}-of-{n_files:05d}.parquet", row_group_size=256)
    stats = {name: {"documents": len(docs), "chars": sum(len(t) for _, _, t in docs)}
             for name, docs in (("pile", pile_docs), ("c4", c4_docs), ("stack", stack_docs))}
    log.info("sample corpora in %s: %s", out, ", ".join(
        f"{s} {v['documents']} docs ({v['chars'] / 1e6:.1f} MB)" for s, v in stats.items()))
    return stats
