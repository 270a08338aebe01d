"""Progress lines for long jobs: documents, tokens, tokens/s and an ETA from bytes read."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("data_prep.progress")


def _fmt_secs(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total_bytes: int, every: float = 5.0):
        self.total, self.every = max(total_bytes, 1), every
        self.t0 = self.last = time.monotonic()

    def report(self, docs: int, tokens: int, done_bytes: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        frac = min(done_bytes / self.total, 1.0)
        eta = dt * (1 - frac) / frac if frac > 0 else float("inf")
        log.info("%d docs, %.1fM tokens, %.2fM tokens/s, %.0f%% of input, ETA %s", docs,
                 tokens / 1e6, tokens / dt / 1e6, 100 * frac,
                 _fmt_secs(eta) if eta != float("inf") else "?")
