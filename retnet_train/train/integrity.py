"""files.json: the size and sha256 of every file of a checkpoint, written when it is saved and
checked before it is loaded, so a damaged, truncated or incomplete checkpoint is named file by
file instead of loading as garbage (or failing deep inside torch.load).

Hashing is shared: the files are dealt out to the ranks by size (each hashes its share, a few
seconds for a 13B run's optimizer state), rank 0 writes the manifest. Called by one process
(export, generate) it hashes everything itself.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from retnet_train.data.tokenizer import file_sha256

FILES = "files.json"
FORMAT = "retnet_train-checkpoint-files-v1"

Gather = Callable[[object], list]  # all_gather of a picklable object over the ranks


def single_process(obj) -> list:
    """The Gather of a process that is alone (export, generate)."""
    return [obj]


def list_files(folder: Path) -> list[str]:
    """Every file under folder (relative, '/'-separated, sorted), but the manifest itself."""
    out = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            rel = Path(dirpath, n).relative_to(folder).as_posix()
            if rel != FILES:
                out.append(rel)
    return sorted(out)


def _my_share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """Largest first, each file to the rank with the least bytes so far: the same split on every
    rank (ties go to the lower rank), about equal bytes each."""
    load = [0] * world
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += sizes[name]
        if r == rank:
            mine.append(name)
    return mine


def _hash_all(folder: Path, names: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: file_sha256(folder / n), names)))


def write_manifest(folder: Path, rank: int = 0, world: int = 1, gather: Gather = single_process) -> int:
    """Hash the folder's files (this rank's share) and, on rank 0, write files.json.
    Every rank must call it after all ranks finished writing. Returns the total bytes."""
    sizes = {n: (folder / n).stat().st_size for n in list_files(folder)}
    digests: dict[str, str] = {}
    for part in gather(_hash_all(folder, _my_share(sizes, rank, world))):
        digests.update(part)
    if rank == 0:
        manifest = {"format": FORMAT,
                    "files": {n: {"bytes": sizes[n], "sha256": digests[n]} for n in sorted(sizes)}}
        tmp = folder / (FILES + f".part{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / FILES)
    return sum(sizes.values())


def read_manifest(folder: Path) -> Optional[dict]:
    """{name: {"bytes", "sha256"}}; None if the checkpoint has no files.json (an older version
    wrote it); ValueError if the manifest itself is unreadable."""
    path = folder / FILES
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        if m.get("format") != FORMAT:
            raise ValueError(f"format {m.get('format')!r}, expected {FORMAT!r}")
        return {str(k): {"bytes": int(v["bytes"]), "sha256": str(v["sha256"])} for k, v in m["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable checksum manifest ({e})") from None


def total_bytes(folder: Path) -> Optional[int]:
    try:
        files = read_manifest(folder)
    except ValueError:
        return None
    return None if files is None else sum(f["bytes"] for f in files.values())


def find_problems(folder: Path, rank: int = 0, world: int = 1, gather: Gather = single_process,
                  checksums: bool = True) -> Optional[list[str]]:
    """What is wrong with the checkpoint's files, one line each (empty: intact); None when it
    has no files.json to check against. Every rank must call it; all get the same answer.
    Sizes are always checked; checksums (the expensive part) unless checksums=False."""
    try:
        files = read_manifest(folder)
    except ValueError as e:
        return [str(e)]
    if files is None:
        return None
    problems, present = [], {}
    for name, want in files.items():
        try:
            size = (folder / name).stat().st_size
        except FileNotFoundError:
            problems.append(f"{folder / name}: missing")
            continue
        if size != want["bytes"]:
            problems.append(f"{folder / name}: {size} bytes, files.json says {want['bytes']} (truncated or "
                            "overwritten)")
        else:
            present[name] = size
    if checksums:
        mine = _my_share(present, rank, world)
        for part in gather(_hash_all(folder, mine)):
            for name, digest in part.items():
                if digest != files[name]["sha256"]:
                    problems.append(f"{folder / name}: sha256 {digest[:12]}..., files.json says "
                                    f"{files[name]['sha256'][:12]}... (the content is damaged)")
    return sorted(problems)
