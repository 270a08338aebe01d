"""Benches stopped part-way keep what they measured.

A bench measures its configurations one after another, each in a fresh process, and writes its table
at the end. Stopped by SIGTERM (`timeout`, a batch system) or Ctrl-C, it used to lose every finished
row with it (2026-12-07, H100: fla's row of bench/train_step.py, transcribed from the log by hand).
measure_until_stopped turns either signal into an early end: the rows so far and the signal, which
the bench writes (marked cut short) and then exits with 128 + that number. Raised inside
subprocess.run, the stop also kills the measuring child, which may be a trainer that would otherwise
wait for a step boundary its compilation has not reached.
"""

from __future__ import annotations

import signal
from typing import Callable, Iterable, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Stop(Exception):
    pass


def measure_until_stopped(items: Iterable[Item], measure: Callable[[Item], Result]) -> tuple[list[Result], int | None]:
    """[measure(item) for item in items], ended early by SIGTERM or Ctrl-C: the results of the items
    that finished, and the signal's number (None when every item ran)."""
    def stop(signum, frame):
        raise _Stop(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    out: list[Result] = []
    try:
        for item in items:
            out.append(measure(item))
    except _Stop as stopped:
        return out, stopped.args[0]
    except KeyboardInterrupt:
        return out, int(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return out, None


def cut_note(signum: int, done: int, planned: int) -> str:
    return f"CUT SHORT by {signal.Signals(signum).name} after {done} of {planned} runs: the rows are those that finished"
