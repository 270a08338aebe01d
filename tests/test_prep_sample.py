"""`data_prep sample --site-packages`: more documents than the default, the default's documents
unchanged, and no text in two sources (a file gives its source or its docstrings, not both)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from data_prep import sample
from data_prep.readers import Doc, FileReader


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _module(name: str, lines: int = 3) -> str:
    body = "".join(f"    x{i} = {i}\n" for i in range(lines))
    return f'"""Module {name} says hello."""\n\n\ndef f_{name}():\n    """Function of {name}."""\n{body}'


def _texts(out: Path) -> dict[str, list[str]]:
    globs = {"pile": "pile/*.jsonl.zst", "c4": "c4/*.json.gz", "stack": "stack/data/*/*.parquet"}
    return {s: [r.text for p in sorted(out.glob(g)) for r in FileReader(str(p)) if isinstance(r, Doc)]
            for s, g in globs.items()}


def test_site_packages_add_documents_and_keep_the_default(tmp_path, monkeypatch):
    stdlib = _tree(tmp_path / "stdlib", {f"m{i}.py": _module(f"std{i}") for i in range(4)})
    site = _tree(tmp_path / "site", {**{f"pkg{i}/mod.py": _module(f"site{i}", 20 * i) for i in range(12)},
                                     "vendor/copy.py": _module("site3", 60),   # a vendored copy: taken once
                                     "pkg0/tests/test_x.py": _module("a_test")})  # tests are left out
    paths = {"stdlib": str(stdlib), "purelib": str(site), "platlib": str(site)}
    monkeypatch.setattr(sample, "sysconfig", SimpleNamespace(get_paths=lambda: paths))

    default = sample.write_sample(str(tmp_path / "default"))
    more = sample.write_sample(str(tmp_path / "more"), site_packages_mb=1)
    base, extended = _texts(tmp_path / "default"), _texts(tmp_path / "more")

    for s in ("pile", "c4", "stack"):
        assert set(base[s]) <= set(extended[s])              # the default's documents are all still there
        assert more[s]["documents"] == len(extended[s]) > default[s]["documents"] == len(base[s])
    site_docs = [t for s in ("pile", "c4") for t in set(extended[s]) - set(base[s])]
    site_code = set(extended["stack"]) - set(base["stack"])
    assert not any(f"site{i}" in t for i in range(12) for t in base["pile"] + base["c4"] + base["stack"])
    for i in range(12):  # each package file's text is in exactly one source
        assert sum(f"Module site{i} " in t for t in site_docs) + sum(f"Module site{i} " in t for t in site_code) == 1
    assert not any("a_test" in t for ts in extended.values() for t in ts)
    assert len(list((tmp_path / "default" / "pile").glob("*"))) == sample.FILES_PER_SOURCE
    assert len(list((tmp_path / "more" / "pile").glob("*"))) == sample.SITE_FILES_PER_SOURCE
