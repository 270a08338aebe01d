"""Progress for long jobs, one helper for every tool (tokenizer, shards, export, evaluation, generation).

On a terminal: a tqdm bar on stderr. Otherwise (CI, a log file, a pipe): a plain line every
`every` seconds and one at the end, so logs get readable lines and no carriage returns.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def _fmt_secs(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_num(x: float, unit: str) -> str:
    if unit == "B":  # bytes read the way people read file sizes
        for name, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if x >= div:
                return f"{x / div:.1f}{name}"
        return f"{x:.0f}B"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def is_terminal(stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class Bar:
    """A count toward an optional total. update(n) adds, set(n) jumps (for counters that live
    elsewhere, e.g. in worker processes); note(...) shows extra figures. Use as a context manager
    or call close(); `enabled=False` (e.g. on ranks other than 0) makes every call a no-op."""

    def __init__(self, desc: str, total: Optional[float] = None, unit: str = "it", every: float = 10.0,
                 enabled: bool = True, stream=None):
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.n, self.extra = enabled, 0, ""
        self.t0 = self.last = time.monotonic()
        self._tqdm = None
        if enabled and is_terminal(self.stream):
            from tqdm import tqdm

            self._tqdm = tqdm(desc=desc, total=total, unit=unit, file=self.stream, dynamic_ncols=True,
                              unit_scale=unit == "B", unit_divisor=1000)

    def update(self, n: float = 1) -> None:
        self.set(self.n + n)

    def set(self, n: float) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.update(n - self.n)
        self.n = n
        if self._tqdm is None and time.monotonic() - self.last >= self.every:
            self._line()

    def note(self, text: str) -> None:
        """Extra figures beside the count, e.g. "120 docs, 1.3M tokens"."""
        self.extra = text
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=False)

    def _line(self, done: bool = False) -> None:
        now = time.monotonic()
        self.last, dt = now, max(now - self.t0, 1e-9)
        count = _fmt_num(self.n, self.unit) + (f"/{_fmt_num(self.total, self.unit)}" if self.total else "")
        parts = [f"{self.desc}: {count} {self.unit if self.unit != 'B' else ''}".rstrip()]
        if self.total and not done:
            frac = min(self.n / self.total, 1.0)
            eta = dt * (1 - frac) / frac if frac > 0 else None
            parts.append(f"{100 * frac:.0f}%, ETA {_fmt_secs(eta) if eta is not None else '?'}")
        rate = self.n / dt
        parts.append(f"{_fmt_num(rate, 'B')}/s" if self.unit == "B" else f"{rate:.1f} {self.unit}/s")
        if done:
            parts.append(f"done in {_fmt_secs(dt)}")
        if self.extra:
            parts.append(self.extra)
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.enabled = False
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self._line(done=True)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "it",
          every: float = 10.0, enabled: bool = True) -> Iterator[T]:
    """Yield every item of `items` while counting them (total: len(items) where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Bar(desc, total=total, unit=unit, every=every, enabled=enabled) as bar:
        for x in items:
            yield x
            bar.update()


@contextlib.contextmanager
def phase(desc: str, enabled: bool = True, stream=None) -> Iterator[None]:
    """A step with no count to show (e.g. one long library call): a line when it starts and one,
    with its duration, when it ends."""
    stream = stream if stream is not None else sys.stderr
    t0 = time.monotonic()
    if enabled:
        print(f"{desc} ...", file=stream, flush=True)
    yield
    if enabled:
        print(f"{desc}: done in {_fmt_secs(time.monotonic() - t0)}", file=stream, flush=True)
