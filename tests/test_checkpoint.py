"""Checkpoints resume exactly: kill -9 during training and during a save, SIGTERM, ZeRO-3 shards."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from test_train_utils import REPO, TINY, command, env, kill_leftovers, losses, records, run_train

STEPS = 10
ARGS = [f"trainer.max_steps={STEPS}", "checkpoint.every=3", "checkpoint.keep=2", "trainer.eval_at_end=false"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    run_train(run_dir, *ARGS, "deepspeed=zero0")
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return losses(uninterrupted_run)


def _assert_same(run_dir, want):
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))  # the resumed file reads like one run
    assert got == want  # identical floats, not merely close


def _wait_for_step(run_dir, step: int, proc, timeout: float = 120) -> None:
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if path.is_file() and any(r.get("step", 0) >= step for r in _safe_records(path)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def _safe_records(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_kill_9_during_training_then_resume(tmp_path, uninterrupted):
    """A real SIGKILL from outside at a moment we do not choose precisely (after step >= 5)."""
    cmd = command([*TINY, f"run_dir={tmp_path}", *ARGS, "deepspeed=zero0", "trainer.max_steps=100000"])
    # same LR schedule as the uninterrupted run: the decay is over optim.decay_steps, not max_steps
    cmd += [f"optim.decay_steps={STEPS}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(tmp_path, 5, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "checkpoints" / "latest").read_text().startswith("step_")
    proc = run_train(tmp_path, *ARGS, "deepspeed=zero0", f"optim.decay_steps={STEPS}")
    assert "resumed from" in proc.stdout + proc.stderr
    _assert_same(tmp_path, uninterrupted)


def test_kill_9_during_save_then_resume(tmp_path, uninterrupted):
    """SIGKILL after the step-6 shards are on disk but before the checkpoint is published."""
    proc = run_train(tmp_path, *ARGS, "deepspeed=zero0", fault="kill_in_save@6", check=False)
    assert proc.returncode == -signal.SIGKILL
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    assert (ckpts / "step_00000006.tmp").is_dir() and not (ckpts / "step_00000006").exists()
    run_train(tmp_path, *ARGS, "deepspeed=zero0")
    _assert_same(tmp_path, uninterrupted)
    assert not list(ckpts.glob("*.tmp"))
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000009", "step_00000010"]  # keep=2


@pytest.mark.slow
def test_zero3_two_processes_killed_in_save_resume_exactly(tmp_path):
    """Partitioned optimizer state: the resumed ZeRO-3 run equals the uninterrupted ZeRO-3 run."""
    whole = tmp_path / "whole"
    run_train(whole, *ARGS, "deepspeed=zero3", nproc=2, launcher="torchrun")
    cut = tmp_path / "cut"
    proc = run_train(cut, *ARGS, "deepspeed=zero3", nproc=2, launcher="torchrun", fault="kill_in_save@6",
                     check=False)
    assert proc.returncode != 0
    assert (cut / "checkpoints" / "latest").read_text() == "step_00000003"
    run_train(cut, *ARGS, "deepspeed=zero3", nproc=2, launcher="torchrun")
    assert losses(cut) == losses(whole)


def test_sigterm_saves_and_exits_zero(tmp_path):
    cmd = command([*TINY, f"run_dir={tmp_path}", *ARGS, "deepspeed=zero0", "trainer.max_steps=100000",
                   "checkpoint.every=0"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = [r for r in records(tmp_path) if r.get("event") == "checkpoint"]
    assert len(saved) == 1 and saved[0]["reason"] == f"signal {int(signal.SIGTERM)}"
    step = saved[0]["step"]
    assert step >= 2 and (tmp_path / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    proc = run_train(tmp_path, *ARGS, "deepspeed=zero0", f"trainer.max_steps={step + 2}")
    assert f"resumed from {tmp_path}/checkpoints/step_{step:08d}" in proc.stdout + proc.stderr
    assert sorted(losses(tmp_path))[-3:] == [step, step + 1, step + 2]


SAMPLE = REPO / "data" / "sample"


@pytest.mark.slow
@pytest.mark.skipif(not (SAMPLE / ".complete").is_file(), reason="needs `make sample-data`")
def test_resume_with_the_shard_stream_is_exact(tmp_path):
    """The real data stream (loader workers, mixture cursor) through a kill during a save."""
    args = ["trainer.data_source=stream", "data=sample", f"data.tokenizer={SAMPLE}/tokenizer.model",
            *[f"data.sources.{s}.path={SAMPLE}/shards/{s}" for s in ("pile", "c4", "stack")],
            "trainer.max_steps=6", "checkpoint.every=2", "deepspeed=zero0", "trainer.eval_at_end=false"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_train(whole, *args)
    proc = run_train(cut, *args, fault="kill_in_save@4", check=False)
    kill_leftovers(cut)
    assert proc.returncode == -signal.SIGKILL
    run_train(cut, *args)
    assert losses(cut) == losses(whole) and len(losses(whole)) == 6


def test_init_from_starts_a_new_run_from_weights(tmp_path, uninterrupted_run):
    first = uninterrupted_run  # ZeRO-0, 10 steps
    second = tmp_path / "second"
    proc = run_train(second, "trainer.max_steps=1", "deepspeed=zero2", "trainer.eval_at_end=false",
                     f"checkpoint.init_from={first}")
    assert "initialised weights from" in proc.stdout + proc.stderr
    a, b = losses(first), losses(second)
    assert sorted(b) == [1]  # a new run: step counting starts again
    assert b[1] < a[1] - 0.5  # ...from trained weights (ZeRO-0 checkpoint into a ZeRO-2 run)
