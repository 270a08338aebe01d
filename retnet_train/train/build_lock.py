"""A bounded wait for the lock of torch's C++ extension builds (DeepSpeed compiles some of its ops
the first time they are used, e.g. optim.impl=deepspeed, ZeRO offload).

torch serialises a build on a `lock` file in the extensions cache and waits for it with no time
limit; a build killed while compiling leaves the file behind, and every later start on that cache
then sleeps forever, printing nothing. Here the wait says which file it waits for after a minute
and gives up after `timeout_s` with an error naming it.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

ANNOUNCE_AFTER_S = 60.0


class StaleBuildLock(RuntimeError):
    pass


def bound_build_lock_wait(timeout_s: float) -> None:
    from torch.utils.file_baton import FileBaton

    def wait(baton) -> None:
        start = time.monotonic()
        announced = False
        while os.path.exists(baton.lock_file_path):
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise StaleBuildLock(
                    f"waited {waited:.0f} s for the C++ extension build lock {baton.lock_file_path}: a build that "
                    "was killed leaves it behind. If no other process is compiling, delete that file "
                    "(trainer.build_lock_timeout_s sets this wait)")
            if waited > ANNOUNCE_AFTER_S and not announced:
                log.warning("waiting for %s (another process is compiling a C++ extension, or a killed build "
                            "left the lock; giving up after %.0f s)", baton.lock_file_path, timeout_s)
                announced = True
            time.sleep(baton.wait_seconds)

    FileBaton.wait = wait
