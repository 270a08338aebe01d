"""Checkpoints: run_dir/checkpoints/step_NNNNNNNN/, published atomically, pointed to by `latest`.

A checkpoint is written under `<tag>.tmp/` by all ranks (DeepSpeed's model + optimizer shards, and
one trainer-state file per rank: step, tokens, data cursor, RNG states), then rank 0 writes
meta.json, renames the folder to `<tag>` and only then rewrites `latest` (write + rename). A kill
at any moment leaves either the previous checkpoint published or the new one; `.tmp` leftovers are
removed at the next start. The oldest complete checkpoints beyond `keep` are pruned.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from retnet_train.parallel import barrier, get_state

from . import faults

log = logging.getLogger(__name__)

LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def trainer_state_file(rank: int) -> str:
    return f"trainer_state_rank{rank:05d}.pt"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a checkpoints/ folder, or a run_dir."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            return root / (root / LATEST).read_text().strip()
    if (p / "meta.json").is_file():
        return p
    raise FileNotFoundError(f"{path}: not a checkpoint (no meta.json), checkpoints/ folder or run_dir with `latest`")


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.ps = get_state()

    # ---- discovery --------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
        return path

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if TAG_RE.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def clean_partial(self) -> None:
        """Rank 0 removes `.tmp` folders left by a save that was killed."""
        if self.ps.is_main and self.root.is_dir():
            for p in self.root.glob("*.tmp"):
                log.warning("removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)
        barrier()

    # ---- save -------------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        tag = tag_for(step)
        tmp_tag = tag + ".tmp"
        tmp = self.root / tmp_tag
        t0 = time.time()
        if self.ps.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        state_path = tmp / trainer_state_file(self.ps.rank)
        torch.save(trainer_state, str(state_path) + ".part")
        os.replace(str(state_path) + ".part", state_path)
        faults.maybe_kill("kill_in_save", step)
        barrier()
        final = self.root / tag
        if self.ps.is_main:
            _atomic_write(tmp / "meta.json", json.dumps({**meta, "step": step, "tag": tag,
                                                         "world_size": self.ps.world_size,
                                                         "dp_size": self.ps.dp_size,
                                                         "tp_size": self.ps.tp_size}, indent=2))
            if final.exists():  # the same step saved again (after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _atomic_write(self.root / LATEST, tag)
            self._prune()
        barrier()
        if self.ps.is_main:
            log.info("saved checkpoint %s in %.1fs", final, time.time() - t0)
        return final

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        latest = (self.root / LATEST).read_text().strip()
        for p in self.complete()[: -self.keep]:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)

    # ---- load -------------------------------------------------------------------------------------
    def load(self, engine, path: Path, module_only: bool = False) -> tuple[dict, dict]:
        """Load into the engine; return (meta, this rank's trainer state)."""
        meta = json.loads((path / "meta.json").read_text())
        if not module_only and meta.get("dp_size", self.ps.dp_size) != self.ps.dp_size:
            raise RuntimeError(
                f"{path} was written by {meta['dp_size']} data-parallel ranks; this run has {self.ps.dp_size}. "
                "Resuming with a different data-parallel size is not supported (the data cursor is per rank); "
                "use checkpoint.init_from to start a new run from its weights")
        if meta.get("tp_size", 1) != self.ps.tp_size:
            raise RuntimeError(
                f"{path} was written with parallel.tp={meta.get('tp_size', 1)}; this run has parallel.tp="
                f"{self.ps.tp_size}. Export it (python -m retnet_train.export {path} OUT) and start from "
                "checkpoint.init_from=OUT, which works at any tp")
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=module_only,
                                              load_optimizer_states=not module_only,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        state = {} if module_only else torch.load(path / trainer_state_file(self.ps.rank), weights_only=False)
        return meta, state
