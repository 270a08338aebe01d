"""bench/charts.py: a benchmark's curve as a non-empty PNG; nothing to draw is no file, not an error."""

import pytest

pytest.importorskip("matplotlib")


def test_chart_writes_a_png(tmp_path):
    from bench.charts import chart

    path = tmp_path / "c" / "speed.png"
    series = {"retnet": [(512, 1.0), (1024, 1.1), (2048, None)], "transformer": [(512, 1.0), (1024, 2.2)]}
    assert chart(path, "t", "T", "ms", series, logy=True)
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5000
    assert not chart(tmp_path / "none.png", "t", "T", "ms", {"a": [(1, None)]})
    assert not (tmp_path / "none.png").exists()


def test_decode_lib_still_offers_chart():
    from bench import charts, decode_lib

    assert decode_lib.chart is charts.chart
