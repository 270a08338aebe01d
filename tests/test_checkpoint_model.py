"""A checkpoint of another model is refused at resume with the differing keys named, not a shape
error from inside the load and never a fresh start."""

from __future__ import annotations

from pathlib import Path

import pytest

from retnet_train.train.checkpoint import CheckpointError, check_same_model
from test_train_utils import losses, run_train


def test_resume_with_another_model_names_the_keys(tmp_path):
    run_train(tmp_path, "trainer.max_steps=2", "checkpoint.every=2", "trainer.eval_at_end=false")
    proc = run_train(tmp_path, "trainer.max_steps=3", "model.d_model=32", "model.kernels=torch",
                     "trainer.eval_at_end=false", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is a checkpoint of another model: model.d_model=64 in the checkpoint, 32 in this run" in proc.stderr
    assert "meta.json" in proc.stderr and "Traceback" not in proc.stderr
    assert max(losses(tmp_path)) == 2  # nothing trained, nothing overwritten


def test_runtime_keys_may_change():
    saved = {"d_model": 64, "kernels": "auto", "chunk_size": 64, "dropout": 0.0}
    check_same_model(Path("x"), saved, {**saved, "kernels": "torch", "chunk_size": 32})
    with pytest.raises(CheckpointError, match=r"model.n_layers=None in the checkpoint, 4 in this run"):
        check_same_model(Path("x"), saved, {**saved, "n_layers": 4})
