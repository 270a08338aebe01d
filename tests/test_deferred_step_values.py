"""trainer.defer_step_values: the host queues step N + 1 before it reads step N's loss and gradient
norm. The records, evaluations, checkpoints, NaN guard and stop signals come out as with reads at
once; only when the host learns them moves."""

from __future__ import annotations

import pytest

from test_train_utils import losses, records, reference_losses, run_train

COMMON = ["deepspeed=zero0", "trainer.eval_every=2", "checkpoint.every=3", "trainer.eval_at_end=false",
          "checkpoint.save_at_end=false"]
DEFER = "trainer.defer_step_values=true"


def _view(run) -> tuple:
    recs = records(run)
    train = [{k: r[k] for k in ("step", "loss", "grad_norm", "tokens", "lr", "skipped_steps")}
             for r in recs if "event" not in r and "loss" in r]
    evals = [(r["step"], r["val/loss"]) for r in recs if "val/loss" in r]
    bad = [(r["step"], r["batch"]["index"], r["bad_in_row"]) for r in recs if r.get("event") == "bad_step"]
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    return train, evals, bad, saved


def test_deferred_reads_give_the_records_evaluations_and_checkpoints_of_reads_at_once(tmp_path):
    # step 5 is deferred (no evaluation or checkpoint after it) and its loss is NaN
    now, deferred = tmp_path / "now", tmp_path / "deferred"
    run_train(now, "trainer.max_steps=7", *COMMON, fault="nan_loss@5")
    proc = run_train(deferred, "trainer.max_steps=7", *COMMON, DEFER, fault="nan_loss@5")
    assert "trainer.defer_step_values: each step's loss" in proc.stdout + proc.stderr
    assert _view(deferred) == _view(now)
    train, evals, bad, saved = _view(now)
    assert [r["step"] for r in train] == list(range(1, 8)) and train[-1]["skipped_steps"] == 1
    assert [step for step, _ in evals] == [2, 4, 6]
    assert bad == [(5, 8, 1)]  # the data cursor before step 5: 4 steps x 2 micro-batches
    assert saved == ["step_00000003", "step_00000006"]


def test_deferred_bad_steps_still_stop_the_run(tmp_path):
    proc = run_train(tmp_path, "trainer.max_steps=10", "deepspeed=zero0", "trainer.max_bad_steps=3", DEFER,
                     fault="nan_loss@2-10", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert [r["step"] for r in records(tmp_path) if r.get("event") == "bad_step"] == [2, 3, 4]


def test_a_stop_signal_saves_the_step_queued_last_and_the_run_resumes_exactly(tmp_path):
    """The signal comes while step 3 is read, with step 4 already queued: step 4 is read too and
    saved; the resumed run trains on to the reference losses."""
    args = ["trainer.max_steps=6", "deepspeed=zero0", "checkpoint.every=0", "trainer.eval_at_end=false",
            "optim.decay_steps=6", DEFER]
    run_train(tmp_path, *args, fault="sigusr1_last_rank@3")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000004"]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    run_train(tmp_path, *args)
    got, want = losses(tmp_path), reference_losses(6)
    assert sorted(got) == list(range(1, 7))
    for step, loss in got.items():
        assert abs(loss - want[step]) < 1e-5, (step, loss, want[step])


def _values(device):
    import torch

    from retnet_train.train.step_values import StepValues

    loss = torch.tensor(6.25, dtype=torch.float64, device=device)
    norm = torch.tensor(1.5, dtype=torch.float32, device=device)
    return [StepValues(loss, g).read() for g in (norm, 2.5, None)]


def test_step_values_read_the_loss_and_a_norm_given_as_a_tensor_a_float_or_none():
    assert _values("cpu") == [(6.25, 1.5), (6.25, 2.5), (6.25, None)]


@pytest.mark.gpu
def test_step_values_on_a_gpu_come_through_pinned_memory():
    assert _values("cuda") == [(6.25, 1.5), (6.25, 2.5), (6.25, None)]
