"""Context parallelism on CPU (gloo): a sequence split over 2 or 4 ranks gives the logits and the
gradients of the whole sequence on one rank, in the parallel and chunkwise forms, with documents
that cross slice boundaries, with the torchscale score normalisation, and under tensor parallelism
(cp=2 x tp=2 equals tp=2). One spawn of 4 gloo processes runs every case (module fixture)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from retnet_train.model import build_model

T, B, VOCAB = 64, 2, 128
TOL = 1e-5  # fp32, relative
MODEL = dict(d_model=64, n_layers=2, n_heads=2, vocab_size=VOCAB, chunk_size=8, kernels="torch")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [0, 5, 20, 37]] = True  # documents crossing the slices' boundaries (16, 32, 48 at cp=4)
    starts[1, [33]] = True  # row 1: one document over three slices, then another
    weights = torch.randn(B, T, VOCAB, generator=g)  # the loss: sum(logits * weights)
    return ids, starts, weights


def compare(model, cp, ids, starts, weights, mode) -> dict:
    """cp against the whole sequence on this rank: relative errors of the slice's logits and of the
    gradients (summed over the context-parallel group)."""
    import torch.distributed as dist

    model.zero_grad()
    full = model(ids, mode=mode, doc_starts=starts)
    (full * weights).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    part = model(cp.slice(ids), mode=mode, doc_starts=None if starts is None else cp.slice(starts),
                 context_parallel=cp)
    (part * cp.slice(weights)).sum().backward()
    errors = {"logits": rel(part.detach(), cp.slice(full.detach()))}
    worst = 0.0
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad, group=cp.group)
        worst = max(worst, rel(p.grad, want[n]))
    errors["grads"] = worst
    return errors


def cases(rank: int, world: int, port: int) -> dict:
    import torch.distributed as dist

    from retnet_train.parallel.context_parallel import ContextParallel
    from retnet_train.parallel.tensor_parallel import apply_tensor_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ids, starts, weights = batch()
    cp4 = ContextParallel(dist.group.WORLD, rank, world)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cp2 = ContextParallel(pairs[rank // 2], rank % 2, 2)
    out = {}
    for score_norm in ("none", "torchscale"):
        torch.manual_seed(0)
        model = build_model("retnet_tiny", **MODEL, score_norm=score_norm)
        for mode in ("parallel", "chunkwise"):
            for docs in (False, True):
                s = starts if docs else None
                out[("cp4", score_norm, mode, docs)] = compare(model, cp4, ids, s, weights, mode)
                out[("cp2", score_norm, mode, docs)] = compare(model, cp2, ids, s, weights, mode)
    # cp=2 x tp=2: tensor-parallel pairs (0, 1), (2, 3); context-parallel pairs (0, 2), (1, 3)
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    torch.manual_seed(0)
    model = build_model("retnet_tiny", **MODEL)
    apply_tensor_parallel(model, fs.get_model_parallel_rank(), 2)
    cp_tp = ContextParallel(fs.get_data_parallel_group(), rank // 2, 2)
    vocab = weights.narrow(-1, fs.get_model_parallel_rank() * VOCAB // 2, VOCAB // 2)  # logits are vocab-parallel
    for mode in ("parallel", "chunkwise"):
        out[("cp2xtp2", "none", mode, True)] = compare(model, cp_tp, ids, starts, vocab, mode)
    return out


def worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    try:
        results.put((rank, cases(rank, world, port)))
    except BaseException as e:  # the fixture reports it instead of waiting for a result
        results.put((rank, f"{type(e).__name__}: {e}"))
        raise
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 4, port, results)) for r in range(4)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    failed = {r: out for r, out in got.items() if isinstance(out, str)}
    assert not failed, failed
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


CASES = [(cp, norm, mode, docs) for cp in ("cp2", "cp4") for norm in ("none", "torchscale")
         for mode in ("parallel", "chunkwise") for docs in (False, True)]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_slices_give_the_whole_sequence_logits_and_gradients(errors, case):
    for rank, out in errors.items():
        e = out[case]
        assert e["logits"] < TOL and e["grads"] < TOL, (rank, e)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
def test_context_parallel_with_tensor_parallel_equals_tensor_parallel(errors, mode):
    for rank, out in errors.items():
        e = out[("cp2xtp2", "none", mode, True)]
        assert e["logits"] < TOL and e["grads"] < TOL, (rank, e)


def test_the_transformer_refuses_context_parallelism():
    from retnet_train.parallel.context_parallel import ContextParallel

    model = build_model("transformer_tiny", d_model=32, n_layers=1, n_heads=2, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="parallel.cp=1"):
        model(torch.zeros(1, 8, dtype=torch.long), context_parallel=ContextParallel(None, 0, 2))


def test_a_sequence_that_does_not_split_evenly_is_refused():
    from retnet_train.parallel.context_parallel import ContextParallel

    with pytest.raises(ValueError, match="parallel.cp=4"):
        ContextParallel(None, 1, 4).slice(torch.zeros(1, 10))


# ---- the trainer ----------------------------------------------------------------------------------


def test_a_cp2_run_trains_like_one_process_resumes_at_cp1_and_exports(tmp_path):
    """torchrun, 2 processes, parallel.cp=2: both read the same samples, each trains on half of
    every sequence; its losses are those of one process on the whole sequences. Its checkpoint
    (ZeRO-2 over the 2 ranks) resumes in one process at cp=1 with the same next loss, and exports."""
    import subprocess
    import sys

    from test_train_utils import REPO, env, losses, reference_losses, run_train

    run = tmp_path / "run"
    common = ["trainer.mode=chunkwise", "model.chunk_size=16", "optim.decay_steps=3"]
    run_train(run, "trainer.max_steps=2", "parallel.cp=2", "checkpoint.every=2", *common, nproc=2,
              launcher="torchrun")
    proc = run_train(run, "trainer.max_steps=3", *common)
    assert "RESHARDING" in proc.stdout + proc.stderr  # ZeRO's partitions: 2 ranks -> 1
    got, want = losses(run), reference_losses(3)
    assert sorted(got) == [1, 2, 3]
    for step, loss in got.items():
        assert abs(loss - want[step]) < 1e-5, (step, loss, want[step])
    out = subprocess.run([sys.executable, "-m", "retnet_train.export", str(run / "checkpoints" / "step_00000002"),
                          str(tmp_path / "export")], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_a_cp2_run_at_zero0_reduces_the_gradients_over_its_ranks(tmp_path):
    """At ZeRO-0 with one data-parallel rank the trainer skips DeepSpeed's gradient all-reduce; with
    cp=2 the two ranks hold the gradients of two halves of each sequence, and the reduction must run
    (DeepSpeed's data-parallel group holds the cp ranks): the one-process losses, and the log says so."""
    from test_train_utils import losses, reference_losses, run_train

    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=3", "parallel.cp=2", "deepspeed=zero0", "trainer.mode=chunkwise",
              "model.chunk_size=16", "optim.decay_steps=3", "trainer.eval_at_end=false",
              "checkpoint.save_at_end=false", nproc=2, launcher="torchrun")
    got, want = losses(run), reference_losses(3)
    assert sorted(got) == [1, 2, 3]
    for step, loss in got.items():
        assert abs(loss - want[step]) < 1e-5, (step, loss, want[step])
    assert "gradient all-reduce on" in (run / "logs" / "rank00000.log").read_text()


@pytest.mark.parametrize("overrides,needle", [
    (["model=transformer_tiny", "parallel.cp=2"], "model.arch='transformer' needs parallel.cp=1"),
    (["parallel.cp=2", "trainer.seq_len=63", "trainer.global_batch_tokens=504"], "does not divide trainer.seq_len=63"),
    (["parallel.cp=2", "trainer.mode=chunkwise", "trainer.seq_len=64", "model.chunk_size=64"],
     "32 tokens per rank is not a whole number of chunks of 64"),
    (["parallel.cp=3", "trainer.seq_len=96"], "parallel.cp=3: times parallel.tp=1 does not divide the world size 2"),
])
def test_impossible_context_parallel_configs_stop_at_start_up_naming_the_key(monkeypatch, overrides, needle):
    from retnet_train.config import ConfigError, load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as e:
        load_config(["trainer.data_source=synthetic", "trainer.global_batch_tokens=4096", "trainer.seq_len=64",
                     "trainer.micro_batch_size=1", *overrides])
    assert needle in str(e.value) and "parallel.cp" in str(e.value)
