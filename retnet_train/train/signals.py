"""Stop requests: SIGTERM / SIGUSR1 (cluster preemption, `timeout`, torchrun's agent) and SIGINT
(Ctrl-C). The handler only notes the first signal; the loop agrees on it over every rank, saves a
checkpoint after the current step and exits 0.

Repeats are ignored on purpose: a signal sent to the whole process group usually arrives twice
(once from the sender, once forwarded by torchrun's agent or a launch script), and the second must
not abort the save that the first started. To stop without a checkpoint, send SIGKILL.
Nothing is logged inside the handler (logging takes locks the interrupted code may hold); the
loop logs one line per stop.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self, signals=STOP_SIGNALS):
        self.signum: int | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
