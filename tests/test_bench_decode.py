"""bench/decode.py end to end on CPU with the tiny presets: every section's table has its rows."""

from __future__ import annotations

import importlib.util
import re

from bench import decode

TINY = "retnet_tiny,transformer_tiny"


def test_decode_bench_runs_every_section_on_cpu(tmp_path):
    tables = decode.main([
        "--device", "cpu", "--threads", "1", "--dtype", "fp32", "--pair", TINY, "--step-pair", TINY,
        "--contexts", "48,96", "--memory-batch", "2", "--new-tokens", "2", "--max-batch", "2",
        "--at-context", "96", "--batches", "1,2", "--step-batch", "2", "--step-prompt", "16",
        "--steps", "2", "--warmup-steps", "1", "--prompt-len", "8", "--no-save", "--chart-dir", str(tmp_path)])
    assert set(tables) == {"memory", "throughput", "latency", "step", "summary"}
    header, rows = tables["memory"]
    assert [r[0] for r in rows] == ["weights only", 48, 96] and rows[1][2] == "-"  # no GPU: no memory figure
    header, rows = tables["throughput"]
    assert [r[0] for r in rows] == [48, 96] and all(r[1] == "2" and float(r[2]) > 0 for r in rows)
    assert header[-1] == "retnet_tiny / transformer_tiny" and all(r[-1].endswith("x") for r in rows)
    header, rows = tables["latency"]
    assert header[2] == "retnet_tiny floor ms" and [r[0] for r in rows] == [1, 2]
    assert all(float(x) > 0 for r in rows for x in r[1:])
    header, rows = tables["step"]
    assert [(r[0], r[1]) for r in rows] == [("retnet_tiny", 2), ("retnet_tiny", 1),
                                            ("transformer_tiny", 2), ("transformer_tiny", 1)]
    assert all(float(r[6]) > 0 for r in rows)  # the bandwidth floor
    header, rows = tables["summary"]
    assert len(rows) == 4 and re.search(r"= \d+\.\d+x$", rows[0][3]) and "within" in rows[2][1]
    assert rows[3][0].startswith("memory-bandwidth floor spread") and "within" in rows[3][1]
    if importlib.util.find_spec("matplotlib"):  # optional: without it the bench says so and goes on
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            f"decode_{s}_retnet_tiny_vs_transformer_tiny.png" for s in ("latency", "throughput")]


def test_largest_batch_halves_until_one_fits(monkeypatch):
    from bench import decode_lib

    def fake(model, batch, *args, **kw):
        return decode_lib.OOM if batch > 2 else {"batch": batch}

    monkeypatch.setattr(decode_lib, "run_setting", fake)
    assert decode_lib.largest_batch(None, 8, 1024, 16, 1, 2) == ({"batch": 2}, [8, 4])
    monkeypatch.setattr(decode_lib, "run_setting", lambda *a, **k: decode_lib.OOM)
    assert decode_lib.largest_batch(None, 4, 1024, 16, 1, 2) == (decode_lib.OOM, [4, 2, 1])


def test_largest_batch_bisects_towards_the_first_that_did_not_fit(monkeypatch):
    from bench import decode_lib

    tried = []

    def fits_up_to(limit):
        def fake(model, batch, *args, **kw):
            tried.append(batch)
            return decode_lib.OOM if batch > limit else {"batch": batch}
        return fake

    monkeypatch.setattr(decode_lib, "run_setting", fits_up_to(14))
    assert decode_lib.largest_batch(None, 64, 1024, 16, 1, 2, refine=8) == ({"batch": 14}, [64, 32, 16, 15])
    assert tried == [64, 32, 16, 8, 12, 14, 15]
    # to within 1/8 of the fit: 128 fits, 256 not -> 192, 224, 240 (16 apart: done)
    tried.clear()
    monkeypatch.setattr(decode_lib, "run_setting", fits_up_to(250))
    assert decode_lib.largest_batch(None, 256, 1024, 16, 1, 2, refine=8) == ({"batch": 240}, [256])
    assert tried == [256, 128, 192, 224, 240]
    # nothing failed (the cap fits) or refine off: no bisection
    tried.clear()
    assert decode_lib.largest_batch(None, 16, 1024, 16, 1, 2, refine=8) == ({"batch": 16}, [])
    assert decode_lib.largest_batch(None, 256, 1024, 16, 1, 2) == ({"batch": 128}, [256])
    assert tried == [16, 256, 128]
