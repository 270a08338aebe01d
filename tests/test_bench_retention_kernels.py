"""bench/retention_kernels.py's timer: single calls each between their own events (the median), or
queued calls back to back between one pair (the mean per call). The CUDA events are faked with a
clock that each call of the timed function advances (no GPU here)."""

from __future__ import annotations

import pytest
import torch

from bench import retention_kernels as bench


class _Clock:
    def __init__(self):
        self.now = 0.0
        self.records = 0


def _fake_events(monkeypatch, clock):
    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            clock.records += 1
            self.t = clock.now

        def elapsed_time(self, other):
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def test_single_calls_give_the_median_and_queued_calls_the_mean(monkeypatch):
    clock = _Clock()
    _fake_events(monkeypatch, clock)
    durations = iter([9.0, 9.0, 9.0, 1.0, 5.0, 2.0, 50.0, 3.0])  # 3 warm-up calls, then 5 timed

    def call():
        clock.now += next(durations)

    assert bench.time_ms(call, warmup=3, reps=5) == 3.0  # median of 1, 5, 2, 50, 3
    assert clock.records == 10  # two events per single call
    clock.records = 0
    durations = iter([9.0, 1.0, 5.0, 2.0, 50.0, 3.0])
    assert bench.time_ms(call, warmup=1, reps=5, queued=True) == pytest.approx(61.0 / 5)
    assert clock.records == 2  # one pair around all five
