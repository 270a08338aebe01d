"""Training with tensor parallelism (gloo, CPU): tp=2 and tp=2 x dp=2 give the single-process
losses; a tp=2 checkpoint resumes at tp=1 and back; checkpoints of tp=2 runs export to one model
with the same loss, which starts a run at another tp; two torchrun "nodes" joined by rendezvous
train and checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from test_export import _val_loss_of_export
from test_train_utils import REPO, TINY, env, evals, free_port, losses, records, reference_losses, run_train

# fp32 on CPU. The sharded matmuls and all-reduces sum in another order than one process does, so
# the first loss agrees to rounding (1e-6 relative); Adam then divides rounding-sized gradient
# differences by small second moments, and later losses agree to 1e-4 (seen: 2e-5 at step 3).
FIRST_STEP_TOLERANCE = 1e-6
TOLERANCE = 1e-4


def _close(got: dict, want: dict, steps: int) -> None:
    assert sorted(got) == list(range(1, steps + 1)), got
    for step in got:
        tol = FIRST_STEP_TOLERANCE if step == 1 else TOLERANCE
        assert abs(got[step] - want[step]) < tol * abs(want[step]), (step, got[step], want[step])


# One tp=2 run that two tests share (a torchrun start costs ~20 s of CPU here): 4 steps with
# checkpoints at steps 2 and 4, the LR decay over 6 steps so that a resume to step 6 continues it.
TP2 = ["parallel.tp=2", "optim.decay_steps=6"]


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tp2") / "run"
    run_train(run, "trainer.max_steps=4", *TP2, "checkpoint.every=2", nproc=2, launcher="torchrun")
    return run


@pytest.fixture
def tp2_copy(tmp_path, tp2_run):
    run = tmp_path / "run"
    shutil.copytree(tp2_run, run)
    return run


@pytest.mark.slow
def test_tp2_losses_equal_single_process(tp2_run):
    _close(losses(tp2_run), reference_losses(6), 4)
    assert sorted(p.name for p in (tp2_run / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_00000002", "step_00000004"]


def _export(run, out):
    proc = subprocess.run([sys.executable, "-m", "retnet_train.export", str(run), str(out)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])  # ZeRO-2 shares ZeRO-1's optimizer code (and its resume at tp is tested)
def test_tp2_dp2_losses_equal_single_process(tmp_path, stage):
    """ZeRO composes with tp=2 (ZeRO shards over the data-parallel group only); the export gathers
    ZeRO partitions per tensor-parallel rank, then merges the shards."""
    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=3", "parallel.tp=2", f"deepspeed=zero{stage}", nproc=4,
              launcher="torchrun", timeout=400)
    _close(losses(run), reference_losses(3), 3)
    _export(run, tmp_path / "export")
    want = evals(run)[-1]["val/loss"]
    assert abs(_val_loss_of_export(tmp_path / "export", n_batches=4) - want) < FIRST_STEP_TOLERANCE * want


@pytest.mark.slow
def test_tp2_checkpoint_resumes_at_tp1_and_back_exports_and_starts_a_tp1_run(tmp_path, tp2_copy):
    run = tp2_copy
    # the tp=2 run's step-4 checkpoint resumes at tp=1 (one process) to step 5, whose checkpoint
    # resumes at tp=2 to step 6: each resharded (weights and Adam moments split or merged by the
    # tensor-parallel split table), the losses those of the uninterrupted reference
    proc = run_train(run, "trainer.max_steps=5", "optim.decay_steps=6")
    out = proc.stdout + proc.stderr
    assert (f"RESHARDING {run}/checkpoints/step_00000004: written at data-parallel size 1, tensor-parallel size 2, "
            "ZeRO-2; this run is 1, 1, ZeRO-2") in out and f"resumed from {run}/checkpoints/step_00000004" in out
    proc = run_train(run, "trainer.max_steps=6", *TP2, nproc=2, launcher="torchrun")
    out = proc.stdout + proc.stderr
    assert "tensor-parallel size 1, ZeRO-2; this run is 1, 2, ZeRO-2" in out
    assert f"resumed from {run}/checkpoints/step_00000005" in out
    _close(losses(run), reference_losses(6), 6)
    want = evals(run)[-1]
    assert want["step"] == 6
    out = tmp_path / "export"
    _export(run, out)
    # the merged model gives the validation loss the tp=2 trainer measured
    assert abs(_val_loss_of_export(out, n_batches=2) - want["val/loss"]) < FIRST_STEP_TOLERANCE * want["val/loss"]
    # and starts a new run at tp=1, whose first loss is the merged model's loss on the first batch
    from retnet_train.model import build_model
    from retnet_train.train.evaluate import lm_loss
    from retnet_train.train.synthetic import SyntheticStream

    model = build_model(out)
    stream = SyntheticStream(256, 64, 4, seed=1234)
    with torch.no_grad():
        first = sum(float(lm_loss(model(b["input_ids"]), b["labels"])) for b in (next(stream), next(stream))) / 2
    run_train(tmp_path / "tp1", "trainer.max_steps=1", f"checkpoint.init_from={out}")
    assert abs(losses(tmp_path / "tp1")[1] - first) < FIRST_STEP_TOLERANCE * first


@pytest.mark.slow
def test_two_nodes_by_rendezvous_train_and_checkpoint(tmp_path):
    """Two torchrun invocations, one process each, meet by c10d rendezvous as two nodes would."""
    port = free_port()
    run = tmp_path / "run"
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes",
             "-m", "retnet_train", *TINY, f"run_dir={run}", "trainer.max_steps=3", "checkpoint.every=2"]
            for _ in range(2)]
    procs = [subprocess.Popen(c, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    _close(losses(run), reference_losses(3), 3)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_00000002", "step_00000003"]


def test_a_signal_on_one_rank_stops_every_rank_together(tmp_path):
    """SIGUSR1 reaching only the last rank (tensor-parallel rank 1, alone in its data-parallel
    group) must still stop both ranks at the same step with one checkpoint, not hang the save."""
    import json

    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=6", "parallel.tp=2", nproc=2, launcher="torchrun",
              fault="sigusr1_last_rank@2", timeout=120)
    saved = [json.loads(p.read_text()) for p in (run / "checkpoints").glob("step_*/meta.json")]
    assert [(m["step"], m["reason"]) for m in saved] == [(2, "signal 10")]
    assert max(losses(run)) == 2


def _grad_norms(run_dir) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in records(run_dir) if r.get("grad_norm") is not None}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_tp2_clips_by_the_whole_models_gradient_norm(tmp_path, stage):
    """The norm that clipping uses covers every slice once: tp=2 logs the tp=1 norm and, with the
    clip well below it, gives the tp=1 losses. Counting one rank's slices gives a smaller norm
    (DeepSpeed does so for parameters not flagged as sharded); a per-rank norm makes the
    replicated weights of the two ranks drift apart. tp=1 here is the plain-PyTorch reference
    (what the single-process trainer computes, test_train.py), clipped at the same 0.05."""
    run_train(tmp_path / "tp2", "trainer.max_steps=3", "parallel.tp=2", "optim.grad_clip=0.05",
              f"deepspeed=zero{stage}", nproc=2, launcher="torchrun")
    want: dict[int, float] = {}
    want_losses = reference_losses(3, clip=0.05, grad_norms=want)
    got = _grad_norms(tmp_path / "tp2")
    assert sorted(want) == sorted(got) == [1, 2, 3]
    assert min(want.values()) > 4 * 0.05  # clipping is active at every step
    for step in want:
        assert abs(got[step] - want[step]) < TOLERANCE * want[step], (step, got, want)
    _close(losses(tmp_path / "tp2"), want_losses, 3)
