"""Helpers shared by the trainer tests (no tests here): run the trainer as a subprocess, read its
metrics, and a plain-PyTorch reference of what the trainer computes."""

from __future__ import annotations

import json
import os
import socket
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A model and batch small enough for 2 CPU cores: 2 layers, d=64; 512 tokens per step in
# 2 micro-batches of 4 x 64 (one process) or 1 per rank (two processes).
TINY = [
    "trainer.data_source=synthetic", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
    "model.vocab_size=256", "trainer.seq_len=64", "trainer.micro_batch_size=4",
    "trainer.global_batch_tokens=512", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=2",
    "optim.warmup_steps=2", "optim.lr=3e-3", "logging.wandb.mode=disabled", "checkpoint.every=0",
]


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RETNET_TRAIN_FAULT", "WANDB_API_KEY"):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(overrides: list[str], nproc: int = 1, launcher: str = "python") -> list[str]:
    if nproc == 1 and launcher == "python":
        return [sys.executable, "-m", "retnet_train", *overrides]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "-m", "retnet_train", *overrides]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
                "--master_port", str(free_port()), "--module", "retnet_train", *overrides]
    raise ValueError(launcher)


def without_dynamo(overrides) -> dict:
    """Environment for a trainer process that does not compile (no trainer.compile, no experiment
    preset: the GPU ones compile): TORCHDYNAMO_DISABLE makes torch.compile a no-op. DeepSpeed's ZeRO
    optimizer check imports its Muon optimizer, whose module-level @torch.compile loads inductor:
    about 1.2 s of every such process. Measured: the whole suite 706 s -> 632 s on a 2-core machine."""
    if any(o.startswith(("trainer.compile=", "experiment=")) and o != "trainer.compile=false" for o in overrides):
        return {}
    return {"TORCHDYNAMO_DISABLE": "1"}


def run_train(run_dir, *overrides: str, nproc: int = 1, launcher: str = "python", fault: str | None = None,
              check: bool = True, timeout: int = 240, **env_extra) -> subprocess.CompletedProcess:
    extra = {**without_dynamo(overrides), **env_extra}
    if fault:
        extra["RETNET_TRAIN_FAULT"] = fault
    cmd = command([*TINY, f"run_dir={run_dir}", *overrides], nproc, launcher)
    # Output through files, not pipes: a killed run's orphaned data-loader workers would hold a pipe open.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(cmd, cwd=REPO, env=env(**extra), stdout=out, stderr=err, timeout=timeout).returncode
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, code, out.read(), err.read())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def records(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "event" not in r and "loss" in r}


def evals(run_dir) -> list[dict]:
    return [r for r in records(run_dir) if "val/loss" in r]


def reference_losses(steps: int, skip: frozenset = frozenset(), seed: int = 1234, lr: float = 3e-3,
                     warmup: int = 2, clip: float = 2.0, betas=(0.9, 0.98), wd: float = 0.05,
                     grad_norms: dict | None = None) -> dict[int, float]:
    """What the trainer must compute for TINY, in plain PyTorch: same init, data, AdamW groups,
    schedule and clipping; steps in `skip` are evaluated but not applied (the NaN guard). Each
    applied step's gradient norm before clipping goes into `grad_norms`, if given.

    The LR schedule and the weight-decay groups are written out here, not taken from
    train/schedule.py and train/optimizer.py, so a bug there cannot hide in both sides."""
    import torch

    from retnet_train.model import build_model
    from retnet_train.train.evaluate import lm_loss
    from retnet_train.train.rng import seed_all
    from retnet_train.train.synthetic import SyntheticStream

    seed_all(seed)
    model = build_model("retnet_tiny", d_model=64, n_layers=2, n_heads=2, vocab_size=256)
    # config.py's optim.weight_decay: the matrices (Linear and Embedding weights) are decayed;
    # norms, biases and gains are not
    matrices = {f"{m}.weight" for m, mod in model.named_modules()
                if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding))}
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in matrices], "weight_decay": wd},
              {"params": [p for n, p in named if n not in matrices], "weight_decay": 0.0}]
    assert groups[0]["params"] and groups[1]["params"]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)

    def lr_at(step):  # 0-based; linear warmup to lr, then linear decay to 0 at `steps` (optim.decay_steps)
        return lr * (step + 1) / warmup if step < warmup else lr * (1 - (step - warmup) / (steps - warmup))

    stream = SyntheticStream(256, 64, 4, seed=seed)
    out = {}
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        total = 0.0
        for _ in range(2):
            b = next(stream)
            loss = lm_loss(model(b["input_ids"]), b["labels"])
            (loss / 2).backward()
            total += loss.item()
        out[step + 1] = total / 2
        if step + 1 in skip:
            opt.zero_grad(set_to_none=True)
            continue
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if grad_norms is not None:
            grad_norms[step + 1] = float(norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def kill_leftovers(run_dir) -> None:
    """SIGKILL processes a killed run left behind (orphaned data-loader workers carry its run_dir)."""
    needle = f"run_dir={run_dir}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
