"""bench/quality.py end to end on CPU: two tiny models on the sample data, a table row each."""

from __future__ import annotations

from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


@pytest.mark.skipif(not (SAMPLE / ".complete").is_file(), reason="needs `make sample-data`")
def test_quality_bench_trains_both_models_on_the_same_tokens(tmp_path):
    from bench import quality

    results = quality.main(["--runs", "retnet", "transformer", "--steps", "2", "--no-save", "--work-dir",
                            str(tmp_path), "--chart", str(tmp_path / "loss.png"), "model.d_model=32",
                            "model.n_layers=1", "trainer.eval_batches=1", "trainer.micro_batch_size=2",
                            "trainer.global_batch_tokens=512"])
    assert set(results) == {"retnet", "transformer"}
    finals = [r["final"] for r in results.values()]
    assert finals[0]["tokens"] == finals[1]["tokens"] == 1024
    for f in finals:
        assert {"val/c4/loss", "val/pile/loss", "val/stack/loss"} <= set(f) and 0 < f["val/loss"] < 20
    assert finals[0]["val/loss"] != finals[1]["val/loss"]
    assert (tmp_path / "loss.png").stat().st_size > 0
