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


def test_rounds_let_the_rows_take_turns_and_report_each_rows_median(monkeypatch):
    calls = []
    # per (row, round): fwd, fwd+bwd, queued; row b's third round is slow (a clock dip)
    plan = {("a", 0): (1.0, 3.0, 2.0), ("a", 1): (1.2, 3.3, 2.2), ("a", 2): (0.9, 2.9, 2.1),
            ("b", 0): (2.0, 6.0, 4.0), ("b", 1): (2.1, 6.2, 4.4), ("b", 2): (9.0, 20.0, 12.0)}
    rounds_seen = {"a": 0, "b": 0}

    def fake_measure(fn, inputs, backward, reps, queued=False):
        name = fn()
        calls.append(name)
        figure = plan[name, rounds_seen[name]][2 if queued else 1 if backward else 0]
        if queued:
            rounds_seen[name] += 1
        return figure

    monkeypatch.setattr(bench, "measure", fake_measure)
    entries = {"a": (lambda: "a", (), 10), "b": (lambda: "b", (), 10)}
    got = bench.measure_rounds(entries, 3)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # turns, not blocks
    assert got["b"] == [plan["b", r] for r in range(3)]
    f, fb, fbq, spread = bench.summarise(got["b"])
    assert (f, fb, fbq) == (2.1, 6.2, 4.4)  # the slow round does not move the median
    assert spread == pytest.approx(100 * (12.0 - 4.0) / 4.4)
    assert bench.summarise(got["a"])[:3] == (1.0, 3.0, 2.1)


def test_a_failed_round_makes_the_row_nan_rather_than_a_median_of_the_rest():
    import math

    out = bench.summarise([(1.0, 2.0, 3.0), (float("nan"), float("nan"), float("nan")), (1.0, 2.0, 3.0)])
    assert all(math.isnan(x) for x in out)


def test_rounds_below_one_are_refused_before_anything_runs(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["retention_kernels.py", "--rounds", "0"])
    with pytest.raises(SystemExit, match="--rounds 0: must be at least 1"):
        bench.main()
