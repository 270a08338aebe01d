"""Checkpoints: run_dir/checkpoints/step_NNNNNNNN/, published atomically, checked before use.

Saving: every rank writes under `<tag>.tmp/` (DeepSpeed's model + optimizer shards, one trainer-state
file per rank); rank 0 writes meta.json; the ranks hash the files and rank 0 writes files.json (sizes
and sha256, see integrity.py); rank 0 renames the folder to `<tag>` and only then rewrites `latest`
(write + rename). A kill at any moment leaves the previous checkpoint published or the new one; `.tmp`
leftovers are removed at the next start. A failed write (a full disk) removes its partial files,
leaves `latest` alone and stops the run with the path and the cause. The oldest complete
checkpoints beyond `keep` are pruned.

Resuming: `latest` first, then older checkpoints, newest first; each is checked against its
files.json and a damaged one is reported file by file and skipped (kept on disk for inspection).
If checkpoints exist but none is intact the run stops: it never silently starts from step 0.

A checkpoint written at another data-parallel size, tensor-parallel size or ZeRO stage is resharded
on the way in (reshard.py): rank 0 converts its optimizer state into `<tag>.tp<N>.universal.tmp/`,
renames it to `<tag>.tp<N>.universal/`, every rank loads its part, and the folder is removed; the
checkpoint itself is only read. The trainer state (step, tokens, counters, data cursor) is the same on
every rank and comes from rank 0's file; each rank's RNG is re-seeded (see state.py).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from retnet_train.parallel import all_gather_objects, barrier, get_state

from . import faults, integrity, reshard
from .cadence import Every
from .state import TrainingState, TrainingStateError

log = logging.getLogger(__name__)

LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8})$")
DISK_FULL_MIB = 16  # after a failed write, less free space than this means the disk filled up


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the folder or file. Raised
    alike on every rank (the ranks agree first), so only rank 0 needs to print it."""

    every_rank = True


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def _is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoint folders under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if TAG_RE.match(p.name) and _is_complete(p)), key=lambda p: p.name)


def candidates(root: Path) -> tuple[list[Path], Optional[str]]:
    """Checkpoints to resume from, in order of preference: the one `latest` names, then every other
    complete one, newest first. Also a note when `latest` names no complete checkpoint."""
    note, first = None, []
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _is_complete(named):
            first = [named]
        else:
            note = f"{pointer} names {named.name}, which is not a complete checkpoint"
    rest = [p for p in reversed(complete_checkpoints(root)) if p not in first]
    return first + rest, note


def pick_intact(paths: list[Path], *, rank: int = 0, world: int = 1, gather=integrity.single_process,
                checksums: bool = True) -> Path:
    """The first of `paths` whose files match its files.json; every rank must call it alike.
    Damaged ones are logged loudly (each bad file named); none intact is a CheckpointError."""
    found: list[str] = []
    for path in paths:
        problems = integrity.find_problems(path, rank, world, gather, checksums)
        if problems is None:
            log.warning("%s has no files.json (written by an older retnet_train): its files are not verified", path)
            problems = _unreadable_meta(path)  # the one file every reader parses first
            if not problems:
                return path
        if not problems:
            if found:
                log.error("RESUMING FROM AN OLDER CHECKPOINT, %s: the newer ones are damaged (see above)", path)
            return path
        found.append(f"{path.name}: " + "; ".join(problems))
        log.error("checkpoint %s is DAMAGED and is skipped (kept on disk for inspection):\n  %s",
                  path, "\n  ".join(problems))
    raise CheckpointError("no intact checkpoint: " + " | ".join(found))


def _unreadable_meta(path: Path) -> list[str]:
    """[a line naming meta.json and what is wrong with it], or [] where it parses as a JSON object."""
    meta = path / "meta.json"
    try:
        if isinstance(json.loads(meta.read_text()), dict):
            return []
        why = "not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"unreadable ({type(e).__name__}: {e})"
    return [f"{meta}: {why}"]


def checkpoint_root(path: Path) -> Optional[Path]:
    """The checkpoints/ folder of a run_dir, or the folder itself if it holds checkpoints."""
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file() or complete_checkpoints(root):
            return root
    return None


def checkpoints_named_by(path: str | Path) -> list[Path]:
    """What a user's path means: a checkpoint folder, that one alone (no fallback: it was named);
    a checkpoints/ folder or run_dir, its checkpoints in order of preference (see candidates)."""
    p = Path(path)
    if _is_complete(p):
        return [p]
    root = checkpoint_root(p)
    if root is None:
        raise FileNotFoundError(f"{path}: not a checkpoint (no meta.json), checkpoints/ folder or run_dir "
                                "with checkpoints")
    paths, note = candidates(root)
    if note:
        log.error(note)
    if not paths:
        raise CheckpointError(f"{root}: {note}; no complete checkpoint there")
    return paths


def resolve_checkpoint(path: str | Path, checksums: bool = True) -> Path:
    """For one process (export, generate): the checkpoint a path names, checked (see
    checkpoints_named_by and pick_intact)."""
    return pick_intact(checkpoints_named_by(path), checksums=checksums)


def describe_write_error(e: BaseException, folder: Path) -> str:
    """One line: a full disk said as such (torch's own message, `unexpected pos`, names neither)."""
    chain, x = [], e
    while x is not None:
        chain.append(x)
        x = x.__cause__ or x.__context__
    try:
        free_mib = shutil.disk_usage(folder if folder.exists() else folder.parent).free / 2**20
    except OSError:
        free_mib = float("nan")
    if any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in chain) or free_mib < DISK_FULL_MIB:
        return f"disk full (ENOSPC) writing {folder}: {free_mib:.1f} MiB free"
    return f"{type(e).__name__} writing {folder}: {e}"


def _write_error(write, folder: Path) -> Optional[str]:
    """Run `write`; the one-line description of the OSError it raised, or None."""
    try:
        write()
    except OSError as e:
        return describe_write_error(e, folder)
    return None


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int, checksums: bool = True, every: Optional[Every] = None,
                 save_at_end: bool = True):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.checksums = checksums
        self.every, self.save_at_end = every, save_at_end  # its cadence: checkpoint.every, checkpoint.save_at_end
        self.ps = get_state()

    # ---- cadence ----------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """A periodic save after this step (checkpoint.every; the last step: see due_at_end)."""
        return self.every is not None and self.every(step)

    def due_at_end(self, step: int) -> bool:
        """The save at the end of the run, unless the checkpoint of this step exists (a finished run
        started again)."""
        latest = self.latest()
        return self.save_at_end and (latest is None or latest.name != tag_for(step))

    # ---- discovery --------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The checkpoint `latest` names, if it is complete (not verified)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        named = self.root / pointer.read_text().strip()
        return named if _is_complete(named) else None

    def resume_point(self) -> Optional[Path]:
        """The newest intact checkpoint to resume from; None when the run has none at all."""
        paths, note = candidates(self.root)
        if note:
            log.error(note)
        if not paths:
            if note:  # a pointer to nothing and nothing else: not a fresh run, say so
                raise CheckpointError(f"{note}, and no other complete checkpoint is in {self.root}. To start a "
                                      "new run, use another run_dir or checkpoint.resume=false")
            return None
        return self.pick(paths)

    def pick(self, paths: list[Path]) -> Path:
        try:
            return pick_intact(paths, rank=self.ps.rank, world=self.ps.world_size, gather=all_gather_objects,
                               checksums=self.checksums)
        except CheckpointError as e:
            raise CheckpointError(f"{e}. The run does not start again from step 0 on its own: fix or move "
                                  f"{self.root} away, or set checkpoint.resume=false for a new run") from None

    def clean_partial(self) -> None:
        """Rank 0 removes what a killed save left: `.tmp` folders and half-written pointer files."""
        if self.ps.is_main and self.root.is_dir():
            for p in self.root.glob("*.tmp"):
                log.warning("removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)
            for p in self.root.glob(f"{LATEST}.part*"):
                p.unlink(missing_ok=True)
            for p in self.root.glob("*.universal"):  # a resharded copy whose load was cut off
                shutil.rmtree(p, ignore_errors=True)
        barrier()

    # ---- save -------------------------------------------------------------------------------------
    def _agree(self, error: Optional[str], cleanup: Optional[Path] = None) -> None:
        """Every rank learns whether any rank failed; then all raise, rank 0 removing `cleanup`."""
        errors = [e for e in all_gather_objects(error) if e]
        if not errors:
            return
        if self.ps.is_main and cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        barrier()
        latest = (self.root / LATEST).read_text().strip() if (self.root / LATEST).is_file() else "none"
        raise CheckpointError(f"checkpoint not saved: {errors[0]}. "
                              f"{'Removed its partial files; ' if cleanup else ''}latest is still {latest}")

    def _space_error(self) -> Optional[str]:
        """On rank 0: too little free space for one more checkpoint of the size of the last one."""
        if not self.ps.is_main:
            return None
        last = self.latest()
        need = integrity.total_bytes(last) if last is not None else None
        if not need:
            return None
        free = shutil.disk_usage(self.root).free
        if free < need:
            return (f"disk full (ENOSPC): {self.root} has {free / 2**20:.1f} MiB free, the last checkpoint took "
                    f"{need / 2**20:.1f} MiB; nothing was written")
        return None

    def save(self, engine, state: TrainingState, meta: dict[str, Any]) -> Path:
        step, trainer_state = state.step, state.state_dict()
        tag = tag_for(step)
        tmp = self.root / (tag + ".tmp")
        t0 = time.time()
        if self.ps.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        self._agree(self._space_error())
        error = None
        try:
            engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
            state_path = tmp / trainer_state_file(self.ps.rank)
            torch.save(trainer_state, str(state_path) + ".part")
            os.replace(str(state_path) + ".part", state_path)
            faults.maybe_disk_full("disk_full_in_save", step, tmp)
        except (OSError, RuntimeError) as e:
            error = describe_write_error(e, tmp)
            # The ranks that wrote their files wait in DeepSpeed's closing barrier: meet them there.
            barrier()
        faults.maybe_kill("kill_in_save", step)
        self._agree(error, cleanup=tmp)
        meta = {**meta, "step": step, "tag": tag, "world_size": self.ps.world_size, "dp_size": self.ps.dp_size,
                "tp_size": self.ps.tp_size, "cp_size": self.ps.cp_size}
        def write_meta():
            if self.ps.is_main:
                _atomic_write(tmp / "meta.json", json.dumps(meta, indent=2))

        self._agree(_write_error(write_meta, tmp), cleanup=tmp)
        self._agree(_write_error(lambda: integrity.write_manifest(tmp, self.ps.rank, self.ps.world_size,
                                                                  all_gather_objects), tmp), cleanup=tmp)
        final = self.root / tag
        if self.ps.is_main:
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
        for p in complete_checkpoints(self.root)[: -self.keep]:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)

    # ---- load -------------------------------------------------------------------------------------
    def _meta(self, path: Path, model_config: dict | None) -> dict:
        meta = json.loads((path / "meta.json").read_text())
        if model_config is not None and isinstance(meta.get("model_config"), dict):
            check_same_model(path, meta["model_config"], model_config)
        return meta

    def load(self, engine, path: Path, model_config: dict | None = None) -> dict:
        """Weights only (checkpoint.init_from: a new run from them); return meta. The checkpoint must
        have this run's tensor-parallel size (an export works at any)."""
        meta = self._meta(path, model_config)
        if meta.get("tp_size", 1) != self.ps.tp_size:
            raise CheckpointError(
                f"{path} was written with parallel.tp={meta.get('tp_size', 1)}; this run has parallel.tp="
                f"{self.ps.tp_size}. Export it (python -m retnet_train.export {path} OUT) and start from "
                "checkpoint.init_from=OUT, which works at any tp")
        self._load_native(engine, path, module_only=True)
        return meta

    def restore(self, engine, path: Path, state: TrainingState, model_config: dict | None = None) -> dict:
        """Resume: model, optimizer and the trainer's state (counters, data cursor, RNG) from `path`,
        written at this run's layout or any other (data-parallel size, tensor-parallel size, ZeRO
        stage, bf16 or fp32 weights). With `model_config` (this run's `model` section), a checkpoint of another model is
        refused, naming the keys. Returns meta."""
        meta = self._meta(path, model_config)
        here = (self.ps.dp_size, self.ps.tp_size, engine.zero_optimization_stage())
        saved = layout_of(meta, here)
        if saved == here and _same_precision(meta, engine):
            self._load_native(engine, path)
        else:
            self._reshard(engine, path, meta, saved, here)
        if saved[:2] == here[:2]:
            state_file = path / trainer_state_file(self.ps.rank)
            trainer = self._read_trainer_state(state_file)
        else:
            # the counters and the data cursor are alike on every rank; the RNG states belong to ranks
            # of the old layout, so none is taken (TrainingState re-seeds)
            state_file = path / trainer_state_file(0)
            trainer = {k: v for k, v in self._read_trainer_state(state_file).items() if k != "rng"}
        try:
            state.load_state_dict(trainer, source=str(state_file))
        except TrainingStateError as e:
            raise CheckpointError(str(e)) from None
        return meta

    def _read_trainer_state(self, path: Path) -> dict:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (each rank of the run that saved {path.parent.name} "
                                  "wrote one)")
        return torch.load(path, weights_only=False)

    def _load_native(self, engine, path: Path, module_only: bool = False) -> None:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=module_only,
                                              load_optimizer_states=not module_only,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")

    def _reshard(self, engine, path: Path, meta: dict, saved: tuple, here: tuple) -> None:
        ps = self.ps
        t0 = time.time()
        zero0 = here[2] == 0
        if saved[1:] == here[1:] and zero0 and _same_precision(meta, engine):
            # ZeRO-0 at the same tensor-parallel size: every data-parallel rank holds the whole
            # optimizer state, in the file of its tensor-parallel rank; DeepSpeed loads it at any size
            log.info("%s was written by %d data-parallel ranks; this run has %d: ZeRO-0 keeps the whole "
                     "optimizer state on every rank, so it loads as it is", path, saved[0], here[0])
            self._load_native(engine, path)
            return
        (log.warning if ps.is_main else log.info)(
            "RESHARDING %s: written at data-parallel size %d, tensor-parallel size %d, ZeRO-%d; this run is %d, "
            "%d, ZeRO-%d. Its weights, Adam moments and step are cut anew for this run", path, *saved, *here)
        if not _same_precision(meta, engine):
            log.info("%s holds %s weights, this run bf16=%s: the weights come from the fp32 masters", path,
                     meta.get("precision"), engine.bfloat16_enabled())
        if zero0:
            # torch's own optimizer (in bf16 inside DeepSpeed's wrapper): every rank reads the whole state
            # and keeps its slice
            error, full = None, None
            try:
                full = reshard.read_full_state(path, meta)
            except reshard.ReshardError as e:
                error = str(e)
            self._agree_load(error)
            reshard.load_plain(engine, full, ps.tp_rank, ps.tp_size)
        else:
            out = self.root / f"{path.name}.tp{ps.tp_size}.universal"
            error = None
            if ps.is_main:
                error = _convert(path, meta, out, ps.tp_size, ps.dp_size)
            self._agree_load(error)
            try:
                reshard.load_universal(engine, out / f"tp{ps.tp_rank}")
            finally:
                barrier()
                if ps.is_main:
                    reshard.remove(out)
        log.info("resharded %s in %.1fs", path.name, time.time() - t0)

    def _agree_load(self, error: Optional[str]) -> None:
        errors = [e for e in all_gather_objects(error) if e]
        if errors:
            raise CheckpointError(f"cannot reshard the checkpoint: {errors[0]}")


def layout_of(meta: dict, here: tuple[int, int, int]) -> tuple[int, int, int]:
    """(data-parallel size, tensor-parallel size, ZeRO stage) of a checkpoint, from its meta.json;
    what an older meta.json does not say is taken to be this run's (`here`), tp 1."""
    return (int(meta.get("dp_size", here[0])), int(meta.get("tp_size", 1)),
            int(meta.get("zero_stage", here[2])))


def _same_precision(meta: dict, engine) -> bool:
    """Whether the checkpoint's DeepSpeed files have this run's layout of precision: bf16 weights
    (the fp32 masters in the optimizer, `bf16_*` file names) or fp32 ones (fp32 and bf16_autocast);
    an older meta.json without `precision` is taken to be this run's."""
    saved = meta.get("precision")
    return saved is None or (saved == "bf16") == engine.bfloat16_enabled()


def _convert(path: Path, meta: dict, out: Path, tp: int, dp: int) -> Optional[str]:
    """Rank 0: the universal copy of checkpoint `path` for `tp` tensor-parallel ranks, written to
    `out`.tmp and renamed to `out` once whole. Returns the error's one line, or None."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        full = reshard.read_full_state(path, meta)
        counters = {**reshard.engine_counters(path), "dp_world_size": dp}
        reshard.write_universal(full, tmp, tp, counters)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except reshard.ReshardError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return str(e)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return describe_write_error(e, tmp)
    return None


# model keys that choose how the same weights run, not what the weights are
RUNTIME_MODEL_KEYS = ("kernels", "chunk_size", "dropout", "rope_reset_at_documents", "extra")


def check_same_model(path: Path, saved: dict, current: dict) -> None:
    """CheckpointError naming every model key whose value differs between the checkpoint's
    meta.json and this run (instead of a shape error deep inside the load)."""
    keys = sorted((set(saved) | set(current)) - set(RUNTIME_MODEL_KEYS))
    diffs = [f"model.{k}={saved.get(k)!r} in the checkpoint, {current.get(k)!r} in this run"
             for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"{path / 'meta.json'} is a checkpoint of another model: " + "; ".join(diffs)
                              + ". Use the checkpoint's model settings, or another run_dir")
