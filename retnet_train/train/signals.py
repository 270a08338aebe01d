"""SIGTERM / SIGUSR1 (cluster preemption): note the request; the loop saves and exits 0."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.signum: int | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        log.warning("received %s: will save a checkpoint after this step and exit", signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None
