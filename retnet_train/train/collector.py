"""Python's cyclic garbage collector during training (trainer.gc_every).

Left to itself the collector runs whenever enough objects have been allocated: at a different
moment on every rank, and, in a full collection of a large heap (compiled graphs, autograd nodes,
data pipeline objects), for tens of milliseconds while the GPU runs dry and the other ranks wait at
the next collective. Run by hand, every rank collects at the same step, where the pause is known.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


class ScheduledCollection:
    """every = 0: Python's own schedule, untouched. every = N > 0: automatic collection off for the
    run, one full collection at the start and one after every N-th step, and the collector restored
    as it was at close()."""

    def __init__(self, every: int):
        if every < 0:
            raise ValueError(f"trainer.gc_every={every}: must be >= 0 (0: Python's automatic collection)")
        self.every = every
        self._was_enabled = gc.isenabled()
        if every:
            gc.collect()  # start from a clean heap: nothing collectable is carried into the run
            gc.disable()
            log.info("trainer.gc_every=%d: Python's automatic garbage collection off; a full collection "
                     "every %d steps on every rank", every, every)

    def step_ended(self, step: int) -> bool:
        """After optimizer step `step`: collect if it is due. Returns whether it collected."""
        if not self.every or step % self.every:
            return False
        gc.collect()
        return True

    def close(self) -> None:
        if self.every and self._was_enabled:
            gc.enable()
