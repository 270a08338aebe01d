"""`report RUN_DIR --plot`: PNG curves from a metrics.jsonl written by hand (the records MetricsWriter
writes: train records, validation records, events), and a clear error without one."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir):
    recs = []
    for step in range(10, 110, 10):
        recs.append({"step": step, "loss": 8.0 / (1 + step / 50), "lr": 3e-4 * min(1, step / 30),
                     "grad_norm": 1.0, "tokens": step * 4096, "tokens_per_s": 5e4 + step, "mfu": 0.3,
                     "mem_gib": 1.5, "eta_s": 10.0, "skipped_steps": 0, "time": 0.0})
        if step % 50 == 0:
            recs.append({"step": step, "tokens": step * 4096, "val/pile/loss": 6.0 - step / 100,
                         "val/pile/ppl": 100.0, "val/c4/loss": 6.5 - step / 100, "val/c4/ppl": 200.0,
                         "val/loss": 6.2 - step / 100, "val/ppl": 150.0})
    recs.append({"step": 100, "event": "checkpoint"})
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 11')


def _report(*args):
    return subprocess.run([sys.executable, "-m", "retnet_train.train.report", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_plot_writes_every_curve(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    proc = _report(run, "--plot")
    assert proc.returncode == 0, proc.stderr
    names = {"train_loss.png", "val_loss.png", "lr.png", "tokens_per_s.png", "memory.png"}
    assert {p.name for p in (run / "plots").iterdir()} == names
    for name in names:
        data = (run / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert proc.stdout.count("chart: ") == len(names)


def test_plot_without_metrics_is_a_clear_error(tmp_path):
    proc = _report(tmp_path, "--plot")
    assert proc.returncode == 2
    assert "no metrics.jsonl" in proc.stderr and str(tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    from retnet_train.train import plots

    run = tmp_path / "run"
    _write_run(run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(plots.PlotError, match=r"\[dev\]"):
        plots.plot_run(run)
