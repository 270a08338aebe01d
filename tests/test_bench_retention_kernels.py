"""bench/retention_kernels.py's timer: single calls each between their own events (the median),
queued calls back to back between one pair (the mean per call), or one call captured in a CUDA graph
and replayed between one pair. The CUDA events, streams and graphs are faked with a clock that each
call of the timed function (or each replay) advances (no GPU here)."""

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
    assert bench.time_ms(call, warmup=1, reps=5, mode="queued") == pytest.approx(61.0 / 5)
    assert clock.records == 2  # one pair around all five


def test_graphed_calls_are_captured_once_and_replayed_between_one_pair_of_events(monkeypatch):
    clock = _Clock()
    _fake_events(monkeypatch, clock)
    log = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            log.append("replay")
            clock.now += 4.0  # each replay: the kernels' time, no host

    def logging_context(enter, leave):  # torch.cuda.graph(g), torch.cuda.stream(s)
        class Context:
            def __init__(self, _):
                pass

            def __enter__(self):
                log.append(enter)

            def __exit__(self, *exc):
                log.append(leave)

        return Context

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "stream", logging_context("side stream", "default stream"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", logging_context("capture", "captured"))

    def call():
        log.append("call")
        clock.now += 9.0  # host and GPU together: never inside the timed replays

    assert bench.time_ms(call, warmup=2, reps=5, mode="graphed") == pytest.approx(4.0)
    # warm-up on the default stream, then on a side stream, one captured call, one untimed replay,
    # then the five timed replays between one pair of events
    assert log == ["call", "call", "side stream", "call", "call", "default stream", "capture", "call",
                   "captured", "replay"] + ["replay"] * 5
    assert clock.records == 2


def test_host_time_is_the_host_clock_per_call_before_the_gpu_is_waited_for(monkeypatch):
    host = _Clock()
    synced = []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: host.now)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced.append(host.now))

    def call():
        host.now += 0.002  # 2 ms of Python and launches per call

    assert bench.time_ms(call, warmup=1, reps=4, mode="host") == pytest.approx(2.0)
    # once after the warm-up, once after the four timed calls: the wait is outside the timing
    assert synced == [pytest.approx(0.002), pytest.approx(0.010)]


def test_an_unknown_timing_mode_is_refused():
    with pytest.raises(ValueError, match="mode 'graph' is not one of"):
        bench.time_ms(lambda: None, mode="graph")


def test_rounds_let_the_rows_take_turns_and_report_each_rows_median(monkeypatch):
    calls = []
    # per (row, round): fwd, fwd+bwd, queued, graphed; row b's third round is slow (a clock dip)
    plan = {("a", 0): (1.0, 3.0, 2.0, 1.5, 0.5), ("a", 1): (1.2, 3.3, 2.2, 1.6, 0.6),
            ("a", 2): (0.9, 2.9, 2.1, 1.4, 0.4), ("b", 0): (2.0, 6.0, 4.0, 3.0, 1.0),
            ("b", 1): (2.1, 6.2, 4.4, 3.1, 1.1), ("b", 2): (9.0, 20.0, 12.0, 9.0, 3.0)}
    rounds_seen = {"a": 0, "b": 0}
    figure_of = {"single": 1, "queued": 2, "graphed": 3, "host": 4}

    def fake_measure(fn, inputs, backward, reps, mode="single"):
        name = fn()
        calls.append(name)
        figure = plan[name, rounds_seen[name]][figure_of[mode] if backward else 0]
        if mode == "host":
            rounds_seen[name] += 1
        return figure

    monkeypatch.setattr(bench, "measure", fake_measure)
    entries = {"a": (lambda: "a", (), 10), "b": (lambda: "b", (), 10)}
    got = bench.measure_rounds(entries, 3)
    assert calls == (["a"] * 5 + ["b"] * 5) * 3  # turns, not blocks
    assert got["b"] == [plan["b", r] for r in range(3)]
    f, fb, fbq, fbg, host, spread = bench.summarise(got["b"])
    assert (f, fb, fbq, fbg, host) == (2.1, 6.2, 4.4, 3.1, 1.1)  # the slow round does not move the median
    assert spread == pytest.approx(100 * (12.0 - 4.0) / 4.4)
    assert bench.summarise(got["a"])[:5] == (1.0, 3.0, 2.1, 1.5, 0.5)


def test_a_failed_round_makes_the_row_nan_rather_than_a_median_of_the_rest():
    import math

    nan = float("nan")
    out = bench.summarise([(1.0, 2.0, 3.0, 1.0, 0.5), (nan,) * 5, (1.0, 2.0, 3.0, 1.0, 0.5)])
    assert all(math.isnan(x) for x in out)
    # a path that runs but cannot be captured loses its graphed figure only
    out = bench.summarise([(1.0, 2.0, 3.0, nan, 0.5), (1.0, 2.0, 3.0, nan, 0.5)])
    assert out[:3] == (1.0, 2.0, 3.0) and math.isnan(out[3]) and out[4:] == (0.5, 0.0)


def test_rounds_below_one_are_refused_before_anything_runs(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["retention_kernels.py", "--rounds", "0"])
    with pytest.raises(SystemExit, match="--rounds 0: must be at least 1"):
        bench.main()
