"""When a periodic thing happens: each component that logs, evaluates or saves holds its own Every."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Every:
    """Due at steps n, 2n, 3n, ... (never when n <= 0) before step `last`, the run's final step; at
    `last` itself only with `at_last` (the components that do something else at the end say no)."""

    n: int
    last: int
    at_last: bool = False

    def __call__(self, step: int) -> bool:
        if step >= self.last:
            return self.at_last and step == self.last
        return self.n > 0 and step % self.n == 0
