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


def test_point_labels_go_beside_their_points_and_skip_the_missing_ones(tmp_path, monkeypatch):
    import matplotlib.axes

    from bench.charts import chart

    seen = []
    real = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, xy, **kw: seen.append((text, tuple(xy))) or real(self, text, xy, **kw))
    series = {"retnet": [(40.0, 5.0), (30.0, None), (24.0, 4.6)], "fla": [(52.0, 4.4)]}
    assert chart(tmp_path / "b.png", "t", "GiB", "tok/s", series, logx=False,
                 point_labels={"retnet": ["none", "0.4", "0.3"], "fla": [""]})
    assert seen == [("none", (40.0, 5.0)), ("0.3", (24.0, 4.6))]  # 0.4 had no figure; fla's empty label unwritten
