"""The README's commands work as written. Every command line of its ```bash blocks (and its
```python block) is taken by exactly one of the handlers below: the CPU ones run (in README order,
in one working directory, training capped at a few steps), the GPU ones must compose their config
(`--cfg`), the launch scripts must print their command (`--dry-run`). A command no handler takes
fails the test: a new README command needs a test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from test_train_utils import REPO, env

README = (REPO / "README.md").read_text()
# a README training command, run briefly: retnet_tiny at 2048 tokens a step takes ~1.3 s of CPU a step,
# and an evaluation of 8 batches per source (tiny_cpu's) ~5 s
SHORT = ["trainer.max_steps=2", "trainer.log_every=1", "trainer.eval_batches=2"]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def commands() -> list[str]:
    """Shell commands of the bash blocks: continuation lines joined, comments dropped."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def kind(cmd: str) -> str:
    words = shlex.split(cmd)
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words = words[1:]
    if cmd == "make test":
        return "ci"  # CI runs it: .ci/run is `make test`
    if cmd == "make train":
        return "make_train"
    if cmd == "source .venv/bin/activate":
        return "venv"
    if words[0] in ("torchrun", "deepspeed") or (words[:3] == ["python", "-m", "retnet_train"]
                                                 and "experiment=tiny_cpu" not in words):
        return "gpu"
    if words[0] == "sbatch" or words[0].startswith("launch/"):
        return "launch"
    if words[:3] == ["python", "-m", "retnet_train.lm_eval"]:
        return "lm_eval"  # downloads the tasks' data: checked, not run
    if words[:2] == ["python", "-m"]:
        return "cpu"
    return "unknown"


def test_every_readme_command_is_covered():
    found = {c: kind(c) for c in commands()}
    assert "unknown" not in found.values(), [c for c, k in found.items() if k == "unknown"]
    assert {"cpu", "gpu", "launch", "make_train", "ci", "venv"} <= set(found.values())
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")


def _run(args, cwd, **extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_cpu_commands_run_in_order(tmp_path):
    """data_prep from raw corpora to verified shards, training on them, export, generate."""
    (tmp_path / "prompts.txt").write_text("def fib(n):\nimport os\n")
    (tmp_path / "data").symlink_to(REPO / "data")  # the sample data that `make` built, where the README runs
    ran = []
    for cmd in commands():
        if kind(cmd) != "cpu":
            continue
        words = shlex.split(cmd)
        if words[2] == "retnet_train":
            words = [w for w in words if not w.startswith("trainer.max_steps=")] + SHORT
        proc = _run([sys.executable, *words[1:]], tmp_path)
        ran.append(words[2])
        if "prompt=" in cmd:
            assert proc.stdout.startswith("def fib(n):")
        if "prompt_file=" in cmd:
            assert "def fib(n):" in proc.stdout and "import os" in proc.stdout
    assert {"data_prep", "retnet_train", "retnet_train.export", "retnet_train.generate",
            "retnet_train.model.summary"} <= set(ran)


def test_python_block_runs():
    (code,) = blocks("python")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["logits"].shape[:2] == (2, 1)


def test_gpu_commands_compose():
    for cmd in commands():
        if kind(cmd) != "gpu":
            continue
        words = shlex.split(cmd)
        overrides = [w for w in words if "=" in w and not w.startswith("-")]
        world = next((int(w) for a, w in zip(words, words[1:]) if a in ("--nproc_per_node", "--num_gpus")), 1)
        _run([sys.executable, "-m", "retnet_train", *overrides, "--cfg"], REPO, WORLD_SIZE=world)


def test_launch_commands_dry_run():
    for cmd in commands():
        if kind(cmd) != "launch":
            continue
        words = shlex.split(cmd)
        extra = {}
        while re.match(r"^[A-Z_]+=", words[0]):
            key, value = words.pop(0).split("=", 1)
            extra[key] = value
        if words[0] == "sbatch":  # the batch script itself, as SLURM would run it
            words = ["bash", *[w for w in words[1:] if not w.startswith("--nodes")]]
        proc = _run(words, REPO, DRY_RUN=1, GPUS_PER_NODE=8, **extra)
        assert "retnet_train" in proc.stdout + proc.stderr


def test_lm_eval_commands_name_a_registered_model_and_known_tasks():
    pytest.importorskip("lm_eval", reason="the eval extra is not installed")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import retnet_train.lm_eval_adapter  # noqa: F401

    known = set(TaskManager().all_tasks)
    for cmd in commands():
        if kind(cmd) != "lm_eval":
            continue
        words = shlex.split(cmd)
        arg = dict(zip(words, words[1:]))
        assert get_model(arg["--model"]).__module__ == "retnet_train.lm_eval_adapter"
        assert "checkpoint=" in arg["--model_args"]
        assert set(arg["--tasks"].split(",")) <= known, set(arg["--tasks"].split(",")) - known


@pytest.mark.slow
def test_make_train(tmp_path):
    run = tmp_path / "run"
    proc = _run(["make", "train", f"TRAIN_RUN={run}", f"ARGS={' '.join(SHORT)}"], REPO,
                MAKEFLAGS="")
    out = proc.stdout + proc.stderr
    assert "val" in out and "--- a sample" in out and (run / "checkpoints" / "latest").is_file()
    if os.environ.get("VIRTUAL_ENV") is None:
        assert (REPO / ".venv").is_dir()
