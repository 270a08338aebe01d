"""Fault injection for the resume and NaN-guard tests: RETNET_TRAIN_FAULT="<point>@<step>[,...]".

Points: `kill_in_save@S` (SIGKILL this process halfway through saving step S, after the DeepSpeed
files are written, before the checkpoint is published), `nan_loss@S` (the loss of step S becomes
NaN), `nan_loss@S-E` (steps S..E), `disk_full_in_save@S` (saving step S fails with ENOSPC after
the DeepSpeed files are written, as on a full disk), `kill@S` (SIGKILL after step S), `sigusr1_last_rank@S` (SIGUSR1
to the last rank alone after step S: a preemption signal that reaches the ranks unevenly). Unset in
normal runs.
"""

from __future__ import annotations

import errno
import os
import signal


def _parse() -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for item in filter(None, os.environ.get("RETNET_TRAIN_FAULT", "").split(",")):
        point, _, steps = item.partition("@")
        lo, _, hi = steps.partition("-")
        out.setdefault(point, set()).update(range(int(lo), int(hi or lo) + 1))
    return out


_FAULTS = _parse()


def active(point: str, step: int) -> bool:
    return step in _FAULTS.get(point, ())


def maybe_kill(point: str, step: int) -> None:
    if active(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal_last_rank(step: int, rank: int, world_size: int) -> None:
    if rank == world_size - 1 and active("sigusr1_last_rank", step):
        os.kill(os.getpid(), signal.SIGUSR1)


def maybe_disk_full(point: str, step: int, path) -> None:
    if active(point, step):
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
