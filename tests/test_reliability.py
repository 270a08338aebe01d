"""Nothing lost, nothing silent, through real processes: signals to a whole process group save and
resume exactly; damaged checkpoints are named and an older intact one is used; a full disk leaves
the last checkpoint usable; typos fail at start-up naming the value."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_train_utils import REPO, TINY, command, env, losses, records, run_train, without_dynamo

SAMPLE = REPO / "data" / "sample"
needs_sample = pytest.mark.skipif(not (SAMPLE / ".complete").is_file(), reason="needs `make sample-data`")
# the real shard stream, so that data-loader worker processes are part of the process group
STREAM = ["trainer.data_source=stream", "data=sample", "trainer.eval_at_end=false"]


def _start(tmp_path, overrides, nproc=1, launcher="python") -> tuple[subprocess.Popen, Path]:
    """The trainer in a process group of its own (as a batch job is), output in a file."""
    log = tmp_path / f"out{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command([*TINY, *overrides], nproc, launcher), cwd=REPO,
                                env=env(**without_dynamo(overrides)), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _wait_for_step(run_dir: Path, step: int, proc, timeout: float = 180) -> None:
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if path.is_file() and any(f'"step": {s},' in path.read_text() for s in range(step, step + 50)):
            return
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def _signal_group_and_wait(proc, sig, timeout: float = 180) -> int:
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a failed test must not outlive it
        except ProcessLookupError:
            pass


def _saved_by_signal(run_dir: Path, sig) -> int:
    saved = [r for r in records(run_dir) if r.get("event") == "checkpoint"]
    assert [r["reason"] for r in saved] == [f"signal {int(sig)}"], saved
    step = saved[0]["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    return step


# ---- signals -------------------------------------------------------------------------------------


# room after the signal at step 2: tiny steps are tens of ms, so several can pass before it lands
SIGNAL_STEPS = 12
SIGNAL_ARGS = [*STREAM, f"data.root={SAMPLE}", f"optim.decay_steps={SIGNAL_STEPS}", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def whole_stream_run(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run that each signalled run must equal after its resume."""
    whole = tmp_path_factory.mktemp("whole_stream")
    run_train(whole, *SIGNAL_ARGS, f"trainer.max_steps={SIGNAL_STEPS}")
    return losses(whole)


@needs_sample
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_to_the_whole_process_group_saves_and_resumes_exactly(tmp_path, sig, whole_stream_run):
    """scancel, preemption, `timeout` and Ctrl-C signal every process of the job, loader workers too."""
    steps, args = SIGNAL_STEPS, SIGNAL_ARGS
    cut = tmp_path / "cut"
    proc, log = _start(tmp_path, [f"run_dir={cut}", *args, "trainer.max_steps=100000"])
    _wait_for_step(cut, 2, proc)
    assert _signal_group_and_wait(proc, sig) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert "Traceback" not in out and "killed by signal" not in out
    assert out.count(f"{sig.name}: stopping at step") == 1  # one line per signal
    step = _saved_by_signal(cut, sig)
    assert step < steps, "the signal came too late to test a resume"
    proc = run_train(cut, *args, f"trainer.max_steps={steps}")
    assert f"resumed from {cut}/checkpoints/step_{step:08d}" in proc.stdout + proc.stderr
    assert losses(cut) == whole_stream_run


@needs_sample
@pytest.mark.slow
def test_sigterm_to_torchrun_and_its_workers_saves_and_resumes_exactly(tmp_path):
    """torchrun's agent forwards SIGTERM to its workers too: they get it twice and save once. The
    ranks agree on the stop through the backend's all-reduce here (parallel.host_group=false); the
    tensor-parallel signal test covers the default gloo group."""
    steps = 4
    args = [*STREAM, f"data.root={SAMPLE}", f"optim.decay_steps={steps}", "checkpoint.every=0",
            "parallel.host_group=false"]
    whole = tmp_path / "whole"
    run_train(whole, *args, f"trainer.max_steps={steps}", nproc=2, launcher="torchrun")
    cut = tmp_path / "cut"
    proc, log = _start(tmp_path, [f"run_dir={cut}", *args, "trainer.max_steps=100000"], nproc=2,
                       launcher="torchrun")
    _wait_for_step(cut, 1, proc)
    _signal_group_and_wait(proc, signal.SIGTERM)  # torchrun itself exits non-zero after a signal
    out = log.read_text()
    assert "killed by signal" not in out and out.count("SIGTERM: stopping at step") == 1, out[-3000:]
    step = _saved_by_signal(cut, signal.SIGTERM)
    assert step < steps, "the signal came too late to test a resume"
    run_train(cut, *args, f"trainer.max_steps={steps}", nproc=2, launcher="torchrun")
    assert losses(cut) == losses(whole)


# ---- checkpoints that prove themselves -----------------------------------------------------------

CKPT = ["checkpoint.every=3", "checkpoint.keep=2", "trainer.eval_at_end=false", "deepspeed=zero0",
        "optim.decay_steps=8"]


@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eight")
    run_train(run_dir, *CKPT, "trainer.max_steps=8")
    return losses(run_dir)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A run of 6 steps with checkpoints at steps 3 and 6; each test damages a copy of it."""
    run_dir = tmp_path_factory.mktemp("six")
    run_train(run_dir, *CKPT, "trainer.max_steps=6")
    return run_dir


@pytest.fixture
def run_copy(tmp_path, six_steps) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    return run_dir


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


MODEL_FILE = "mp_rank_00_model_states.pt"


def test_flipped_byte_is_detected_and_the_previous_checkpoint_used(run_copy, eight_steps):
    tmp_path, ckpts = run_copy, run_copy / "checkpoints"
    assert json.loads((ckpts / "step_00000006" / "files.json").read_text())["files"][MODEL_FILE]["bytes"] > 0
    _flip_byte(ckpts / "step_00000006" / MODEL_FILE)
    proc = run_train(tmp_path, *CKPT, "trainer.max_steps=8")
    out = proc.stdout + proc.stderr
    assert f"{ckpts}/step_00000006/{MODEL_FILE}: sha256" in out and "DAMAGED" in out
    assert f"resumed from {ckpts}/step_00000003" in out and "RESUMING FROM AN OLDER CHECKPOINT" in out
    assert losses(tmp_path) == eight_steps


@pytest.mark.parametrize("damage,says", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "1000 bytes, files.json says"),
    (lambda p: p.unlink(), "missing"),
    (_flip_byte, "sha256"),
], ids=["truncated", "deleted", "flipped"])
def test_each_kind_of_damage_is_named(run_copy, damage, says):
    from retnet_train.train.checkpoint import CheckpointError, resolve_checkpoint

    tmp_path, ckpts = run_copy, run_copy / "checkpoints"
    assert resolve_checkpoint(tmp_path) == ckpts / "step_00000006"
    damage(ckpts / "step_00000006" / MODEL_FILE)
    assert resolve_checkpoint(tmp_path) == ckpts / "step_00000003"  # run_dir: the newest intact one
    with pytest.raises(CheckpointError) as e:  # a checkpoint named directly: that one or an error
        resolve_checkpoint(ckpts / "step_00000006")
    assert f"step_00000006/{MODEL_FILE}: {says}" in str(e.value)


def test_a_broken_meta_json_without_files_json_is_named_not_a_json_traceback(run_copy):
    """An older checkpoint (no files.json: its files are not verified) with a damaged meta.json is
    skipped like a damaged one, its meta.json named, instead of a bare JSONDecodeError later."""
    from retnet_train.train.checkpoint import CheckpointError, resolve_checkpoint

    tmp_path, ckpts = run_copy, run_copy / "checkpoints"
    (ckpts / "step_00000006" / "files.json").unlink()
    (ckpts / "step_00000006" / "meta.json").write_text('{"step": 6,')
    assert resolve_checkpoint(tmp_path) == ckpts / "step_00000003"
    with pytest.raises(CheckpointError, match=r"step_00000006/meta.json: unreadable \(JSONDecodeError"):
        resolve_checkpoint(ckpts / "step_00000006")


def test_no_intact_checkpoint_stops_with_one_line_and_never_restarts_from_zero(run_copy):
    tmp_path, ckpts = run_copy, run_copy / "checkpoints"
    before = (tmp_path / "metrics.jsonl").read_text()
    for tag in ("step_00000003", "step_00000006"):
        _flip_byte(ckpts / tag / MODEL_FILE)
    proc = run_train(tmp_path, *CKPT, "trainer.max_steps=8", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no intact checkpoint" in errors[0] and "step_00000003" in errors[0]
    assert "Traceback" not in proc.stderr and "rank00000.log" in errors[0]
    assert "Traceback" in (tmp_path / "logs" / "rank00000.log").read_text()
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing trained, nothing rewritten


def test_latest_naming_nothing_is_an_error_not_a_fresh_start(run_copy):
    tmp_path, ckpts = run_copy, run_copy / "checkpoints"
    for tag in ("step_00000003", "step_00000006"):
        shutil.rmtree(ckpts / tag)
    proc = run_train(tmp_path, *CKPT, "trainer.max_steps=8", check=False)
    assert proc.returncode == 2
    assert "latest names step_00000006, which is not a complete checkpoint" in proc.stderr


def test_a_failed_save_removes_its_files_and_keeps_latest(tmp_path, eight_steps):
    """ENOSPC while writing (injected after DeepSpeed's files): the run stops naming the cause and
    the path; the partial folder is gone; `latest` still names the last good checkpoint."""
    ext = tmp_path / "torch_extensions"
    proc = run_train(tmp_path, *CKPT, "trainer.max_steps=8", fault="disk_full_in_save@6", check=False,
                     TORCH_EXTENSIONS_DIR=ext)
    assert proc.returncode == 2
    ckpts = tmp_path / "checkpoints"
    assert f"disk full (ENOSPC) writing {ckpts}/step_00000006.tmp" in proc.stderr
    assert "latest is still step_00000003" in proc.stderr
    assert not list(ckpts.glob("*.tmp")) and not list(ckpts.glob("*.part*"))
    assert (ckpts / "latest").read_text() == "step_00000003"
    # no C++ build at start-up on CPU: nothing compiled, no lock to leave behind
    assert not ext.exists() and "shm" not in proc.stdout + proc.stderr
    run_train(tmp_path, *CKPT, "trainer.max_steps=8")
    assert losses(tmp_path) == eight_steps


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def make(size: str) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        if not _tmpfs(path, size):
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_leaves_the_last_checkpoint_usable(tmp_path, small_disk, eight_steps):
    """A real full filesystem: the first save does not fit at all; on a disk that holds one
    checkpoint, the next save is refused before it writes, and the run resumes once there is room."""
    tiny = small_disk("600k")
    proc = run_train(tiny, *CKPT, "trainer.max_steps=3", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"disk full (ENOSPC) writing {tiny}/checkpoints/step_00000003.tmp" in proc.stderr
    assert not list((tiny / "checkpoints").glob("*.tmp"))

    disk = small_disk("6m")
    run_train(disk, *CKPT, "trainer.max_steps=3")
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    filler.write_bytes(b"\0" * (free - 600_000))
    proc = run_train(disk, *CKPT, "trainer.max_steps=6", check=False)
    assert proc.returncode == 2
    assert f"disk full (ENOSPC): {disk}/checkpoints has" in proc.stderr and "latest is still step_00000003" in \
        proc.stderr
    filler.unlink()
    run_train(disk, *CKPT, "trainer.max_steps=8")
    assert losses(disk) == eight_steps


# ---- the rest of the bookkeeping -----------------------------------------------------------------


def test_restart_before_the_first_checkpoint_writes_no_duplicate_steps(tmp_path, eight_steps):
    args = [*CKPT, "checkpoint.every=0", "trainer.max_steps=8"]
    proc = run_train(tmp_path, *args, fault="kill@3", check=False)
    assert proc.returncode == -signal.SIGKILL and sorted(losses(tmp_path)) == [1, 2]  # killed before logging 3
    run_train(tmp_path, *args)
    steps = [r["step"] for r in records(tmp_path) if "loss" in r and "event" not in r]
    assert steps == list(range(1, 9))
    assert losses(tmp_path) == eight_steps


@pytest.mark.slow
def test_a_one_rank_checkpoint_resumes_on_two_ranks(run_copy, eight_steps):
    """ZeRO-0 keeps the whole optimizer state on every rank: a checkpoint of one data-parallel rank
    loads as it is on two, and the data cursor continues (2 ranks x 1 micro-batch read the samples
    of 1 rank x 2), so steps 7 and 8 are those of the uninterrupted one-rank run."""
    tmp_path = run_copy  # a one-rank run with its step-6 checkpoint
    proc = run_train(tmp_path, *CKPT, "trainer.max_steps=8", nproc=2, launcher="torchrun")
    out = proc.stdout + proc.stderr
    assert "was written by 1 data-parallel ranks; this run has 2: ZeRO-0 keeps the whole optimizer state" in out
    assert f"resumed from {tmp_path}/checkpoints/step_00000006" in out
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 9))
    for step in (7, 8):  # fp32: two ranks sum the gradient in another order
        assert abs(got[step] - eight_steps[step]) < 1e-5 * eight_steps[step], (step, got[step], eight_steps[step])


def test_a_stale_build_lock_fails_naming_it(tmp_path):
    from torch.utils.file_baton import FileBaton

    from retnet_train.train.build_lock import StaleBuildLock, bound_build_lock_wait

    lock = tmp_path / "lock"
    lock.write_text("")  # left by a build that was killed
    original = FileBaton.wait
    try:
        bound_build_lock_wait(0.3)
        with pytest.raises(StaleBuildLock, match=str(lock)):
            FileBaton(str(lock)).wait()
        lock.unlink()
        FileBaton(str(lock)).wait()  # no lock: returns at once
    finally:
        FileBaton.wait = original


# ---- typos fail at start-up ----------------------------------------------------------------------


@pytest.mark.parametrize("override,says", [
    ("experiment=tiny", "experiment='tiny': no such experiment"),
    ("+trainer.max_step=3", "trainer.max_step=3: no such key"),
    ("data=smaple", "data='smaple': no such data"),
    ("+foo=1", "foo=1: no such key"),
])
def test_config_typos_exit_2_naming_the_value(override, says):
    proc = subprocess.run(command([override, "--cfg"]), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-2000:]


def test_a_data_root_that_the_data_config_ignores_is_an_error(tmp_path):
    from retnet_train.config import ConfigError, conf_dir, load_config

    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    (conf / "data" / "fixed.yaml").write_text("tokenizer: /d/tok.model\nsources:\n  a:\n    path: /d/a\n")
    with pytest.raises(ConfigError, match="data.root='/elsewhere': this data config's paths do not use"):
        load_config(["data=fixed", "data.root=/elsewhere"], config_dir=str(conf))
    assert load_config(["data=sample", "data.root=/elsewhere"]).data.tokenizer == "/elsewhere/tokenizer.model"


# ---- data checked before step 1 ------------------------------------------------------------------


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _random_bytes(p: Path) -> None:
    p.write_bytes(os.urandom(p.stat().st_size))


@needs_sample
@pytest.mark.parametrize("damage", [_truncate, _random_bytes, Path.unlink], ids=["truncated", "random", "missing"])
def test_a_bad_shard_fails_before_step_1_naming_it(tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data, ignore=shutil.ignore_patterns("raw"))
    shard = sorted((data / "shards" / "stack" / "train").glob("*.tar"))[-1]  # one read late in a real run
    damage(shard)
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *STREAM, f"data.root={data}", "trainer.max_steps=2", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(shard) in errors[0], proc.stderr[-3000:]
    assert not (run_dir / "metrics.jsonl").exists() or not losses(run_dir)  # not one step taken


@pytest.mark.parametrize("tool", ["export", "generate"])
def test_export_and_generate_refuse_a_damaged_checkpoint_in_one_line(run_copy, tool, tmp_path):
    ckpt = run_copy / "checkpoints" / "step_00000006"
    _flip_byte(ckpt / MODEL_FILE)
    args = [str(ckpt), str(tmp_path / "out")] if tool == "export" else [f"checkpoint={ckpt}", "prompt_ids=[1,2]"]
    proc = subprocess.run([*command([])[:2], f"retnet_train.{tool}", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: no intact checkpoint: step_00000006: {ckpt}/{MODEL_FILE}: sha256" in proc.stderr
