"""bench/resume_check.py: a resumed run's losses against the uninterrupted run's (bench/multi_gpu.sh resume)."""

import json

import pytest

from bench import resume_check


def _run(tmp_path, name, losses, evals=()):
    d = tmp_path / name
    d.mkdir()
    lines = [json.dumps({"step": s, "loss": v, "lr": 1e-3}) for s, v in losses]
    lines += [json.dumps({"step": s, "val/c4/loss": 9.0}) for s in evals]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_differences_after_the_stop_use_the_resumed_value(tmp_path, capsys):
    ref = _run(tmp_path, "ref", [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0)], evals=[4])
    # stopped after step 2 (step 3 logged once before the stop, again after the resume: the last counts)
    resumed = _run(tmp_path, "resumed", [(1, 5.0), (2, 4.0), (3, 9.9), (3, 3.0), (4, 2.5)])
    resume_check.main([str(ref), str(resumed), "--after", "2", "--labels", "on 2", "--no-save"])
    out = capsys.readouterr().out
    assert "| 3 | 3.0000 | 3.0000 | +0.0e+00 |" in out
    assert "| 4 | 2.0000 | 2.5000 | +5.0e-01 |" in out
    assert "| 2 |" not in out  # only steps after the stop
    assert "on 2: largest |difference| 5.0e-01" in out


def test_no_common_step_and_label_count_are_errors(tmp_path):
    ref = _run(tmp_path, "ref", [(1, 5.0), (2, 4.0)])
    short = _run(tmp_path, "short", [(1, 5.0)])
    with pytest.raises(SystemExit, match="no step after 1"):
        resume_check.main([str(ref), str(short), "--after", "1", "--no-save"])
    with pytest.raises(SystemExit, match="2 names for 1 resumed runs"):
        resume_check.main([str(ref), str(ref), "--labels", "a", "b", "--no-save"])
    with pytest.raises(SystemExit, match="no metrics"):
        resume_check.main([str(ref), str(tmp_path / "missing"), "--no-save"])
