"""verify_sources / `python -m data_prep verify`: every bad shard is found before step 1,
named, and all of them are listed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import WINDOW, built  # noqa: F401 (built: fixture)

from retnet_train.data import DataConfig, DataError, SourceConfig, verify_sources
from retnet_train.data.shard_reader import index_path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pile", "c4", "stack")


@pytest.fixture
def data(built, tmp_path):
    """A private copy of the built shards (the tests break them) and a config reading it."""
    root = tmp_path / "shards"
    shutil.copytree(built.shards, root)
    cfg = DataConfig(sources={s: SourceConfig(path=str(root / s)) for s in SOURCES},
                     tokenizer=built.tokenizer)
    return root, cfg


def shard(root: Path, source="pile", split="shards", i=0) -> Path:
    m = json.loads((root / source / "manifest.json").read_text())
    return root / source / m[split][i]["path"]


def edit_manifest(root: Path, source: str, fn) -> None:
    path = root / source / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def problem(cfg, full=False) -> str:
    with pytest.raises(DataError) as e:
        verify_sources(cfg, WINDOW, full=full)
    return str(e.value)


def test_good_data_passes(data):
    _, cfg = data
    verify_sources(cfg, WINDOW)
    verify_sources(cfg, WINDOW, full=True)
    verify_sources(cfg, 3 * WINDOW)


def test_truncated_shard(data):
    root, cfg = data
    p = shard(root, "c4", i=1)
    size = p.stat().st_size
    os.truncate(p, size - 700)
    assert problem(cfg) == f"{p}: {size - 700} bytes, manifest.json says {size} (truncated or replaced)"


def test_truncated_shard_of_a_manifest_without_sizes(data):
    """Older manifests record no `bytes`: a cut into the last window is still caught."""
    root, cfg = data
    edit_manifest(root, "stack", lambda m: [x.pop("bytes") for x in m["shards"] + m["val_shards"]])
    p = shard(root, "stack", i=2)
    last = int(np.load(index_path(p))[-1])
    os.truncate(p, last + 5)
    assert re.fullmatch(rf"{re.escape(str(index_path(p)))}: the last window ends at byte \d+, "
                        rf"past the shard's end \({last + 5} bytes\)", problem(cfg))


def test_random_bytes_of_the_right_size(data):
    root, cfg = data
    p = shard(root, "pile", "val_shards", 0)
    p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))
    assert problem(cfg) == f"{p}: not a tar file: first header has no ustar magic"


def test_tar_header_checksum_and_first_member(data):
    root, cfg = data
    p = shard(root, "c4", i=0)
    with open(p, "r+b") as f:
        f.seek(3)  # a byte of the first member's name: the header's checksum no longer holds
        f.write(b"#")
    assert problem(cfg) == f"{p}: not a tar file: first header checksum is wrong"


def test_missing_shard_and_missing_index(data):
    root, cfg = data
    p = shard(root, "stack", i=0)
    p.unlink()
    assert problem(cfg) == f"{p}: missing"
    q = shard(root, "c4", "val_shards", 0)
    index_path(q).unlink()
    msg = problem(cfg)
    assert msg.startswith("2 problems with the configured data:\n")
    assert f"\n  {p}: missing" in msg and f"\n  {index_path(q)}: missing" in msg


def test_sample_count_differs_from_the_manifest(data):
    root, cfg = data
    p = shard(root, "pile", i=1)
    n = len(np.load(index_path(p)))
    edit_manifest(root, "pile", lambda m: m["shards"][1].update(samples=n + 1))
    assert problem(cfg) == f"{index_path(p)}: {n} window offsets, manifest.json says {n + 1} windows"


def test_every_problem_is_reported_then_a_count(data):
    root, cfg = data
    idx = sorted(root.glob("*/*/*.idx.npy"))
    assert len(idx) > 22
    for p in idx:
        p.unlink()
    msg = problem(cfg)
    lines = msg.split("\n")
    assert lines[0] == f"{len(idx)} problems with the configured data:"
    assert len(lines) == 1 + 20 + 1 and lines[-1] == f"  ... and {len(idx) - 20} more"
    assert all(re.fullmatch(r"  \S+\.idx\.npy: missing", line) for line in lines[1:-1])


def test_full_catches_one_flipped_byte(data):
    root, cfg = data
    p = shard(root, "c4", i=2)
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    verify_sources(cfg, WINDOW)  # the cheap check cannot see it
    assert re.fullmatch(rf"{re.escape(str(p))}: sha256 [0-9a-f]{{16}}\.\.\., manifest\.json says "
                        r"[0-9a-f]{16}\.\.\. \(the file changed since it was written\)",
                        problem(cfg, full=True))


def test_manifest_without_sha256(data):
    root, cfg = data
    edit_manifest(root, "c4", lambda m: [x.pop("sha256") for x in m["shards"] + m["val_shards"]])
    verify_sources(cfg, WINDOW)  # still loadable and checked without hashes
    assert problem(cfg, full=True) == (
        f"{root / 'c4' / 'manifest.json'}: records no shard sha256 (written by an older data_prep), "
        "so the shards cannot be fully checked; rerun the same `python -m data_prep shards` "
        "command: it adds them, encoding nothing")


def test_source_level_problems_are_data_errors(data, tmp_path):
    root, cfg = data
    with pytest.raises(DataError, match=r"data\.sources\.c4\.path: .*no training shard holds even one "
                                        r"sample of seq_len 32000"):
        verify_sources(cfg, 1000 * WINDOW)
    shutil.rmtree(root / "pile")
    with pytest.raises(DataError, match=r"data\.sources\.pile\.path: no manifest\.json in .*pile"):
        verify_sources(cfg, WINDOW)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", "verify", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli(data):
    root, _ = data
    ok = run_cli(root, "--full")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"ok: 3 source(s) in {root}, sha256 of every shard checked"
    p = shard(root, "stack", "val_shards", 0)
    os.truncate(p, 1000)
    bad = run_cli(root / "stack")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: {p}: 1000 bytes, manifest.json says")
