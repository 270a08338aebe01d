"""wandb: with mode=online and no API key the run logs offline into run_dir; a restart resumes it."""

from __future__ import annotations

import pytest

from test_train_utils import losses, run_train


def _wandb_env(tmp_path) -> dict:
    """Keep wandb's settings and caches out of the user's home (HOME itself stays: DeepSpeed's
    compiled ops are cached under it)."""
    return {"WANDB_DIR": tmp_path, "WANDB_CONFIG_DIR": tmp_path / "cfg", "WANDB_CACHE_DIR": tmp_path / "cache",
            "WANDB_DATA_DIR": tmp_path / "data"}


@pytest.mark.slow
def test_wandb_offline_run_folder_holds_the_metrics(tmp_path):
    run_train(tmp_path, "trainer.max_steps=3", "deepspeed=zero0", "logging.wandb.mode=online",
              "logging.wandb.project=unit", "logging.wandb.tags=[a,b]", "trainer.eval_at_end=true",
              **_wandb_env(tmp_path))
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"loss", b"grad_norm", b"tokens_per_s", b"mfu", b"val/loss", b"unit"):
        assert key in data, key
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    # a restart with more steps continues the same wandb run id
    run_train(tmp_path, "trainer.max_steps=4", "deepspeed=zero0", "logging.wandb.mode=offline",
              **_wandb_env(tmp_path))
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_wandb_disabled_writes_nothing(tmp_path):
    run_train(tmp_path, "trainer.max_steps=1", "deepspeed=zero0", "logging.wandb.mode=disabled",
              "trainer.eval_at_end=false")
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id.txt").exists()
