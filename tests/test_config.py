"""Config schemas: every preset composes; bad input fails at start-up naming the key and value."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from retnet_train.__main__ import split_argv
from retnet_train.config import ConfigError, batch_layout, conf_dir, load_config
from test_train_utils import REPO, env

SYN = ["trainer.data_source=synthetic"]


def test_default_config_composes():
    cfg = load_config(SYN)
    assert cfg.model.arch == "retnet" and cfg.deepspeed.stage == 2 and cfg.run_dir == "runs/run"
    assert cfg.logging.wandb.mode in ("online", "offline", "disabled")


@pytest.mark.parametrize("name", sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml")))
def test_every_experiment_composes(name, monkeypatch):
    # parallel.tp=4 (retnet_13b) and parallel.cp=2 (the *_cp2 recipes) need worlds of 4 and 2 GPUs or more
    worlds = {"retnet_13b": 4, "retnet_1.3b_256k_cp2": 2}
    if name in worlds:
        monkeypatch.setenv("WORLD_SIZE", str(worlds[name]))
    cfg = load_config([f"experiment={name}", *SYN], )
    assert cfg.name == name


@pytest.mark.parametrize("name,lr,stage", [("retnet_1.3b", 6e-4, 2), ("retnet_2.7b", 3e-4, 2),
                                           ("retnet_6.7b", 3e-4, 3), ("retnet_13b", 3e-4, 1)])
def test_paper_recipe(name, lr, stage, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "64")  # retnet_13b's tp=4 needs a world it divides
    cfg = load_config([f"experiment={name}", *SYN], )
    o, t = cfg.optim, cfg.trainer
    assert (o.lr, list(o.betas), o.weight_decay, o.warmup_steps, o.decay, o.grad_clip) == \
        (lr, [0.9, 0.98], 0.05, 375, "linear", 2.0)
    assert (t.global_batch_tokens, t.seq_len) == (4 * 2**20, 2048)
    assert cfg.model.n_heads and cfg.deepspeed.stage == stage
    layout = batch_layout(cfg.parallel, cfg.trainer, world_size=64)
    assert layout["dp_size"] == 64 // cfg.parallel.tp
    assert layout["grad_accum"] * layout["dp_size"] * t.micro_batch_size == 2048


def test_long_sequence_preset_is_chunkwise():
    cfg = load_config(["experiment=retnet_1.3b_32k", *SYN])
    assert (cfg.trainer.mode, cfg.trainer.seq_len) == ("chunkwise", 32768)


def _error(overrides, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_config([*SYN, *overrides], **kw)
    return str(e.value)


def test_unknown_key_is_named():
    msg = _error(["trainer.max_stepz=3"])
    assert "trainer.max_stepz" in msg


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    (conf / "deepspeed" / "typo.yaml").write_text("stage: 3\nreduce_bucket_sise: 5\n")
    msg = _error(["deepspeed=typo"], config_dir=str(conf))
    assert "reduce_bucket_sise" in msg


def test_wrong_type_is_named():
    msg = _error(["trainer.max_steps=ten"])
    assert "trainer.max_steps" in msg and "ten" in msg


@pytest.mark.parametrize("overrides,key", [
    (["trainer.global_batch_tokens=1000"], "trainer.global_batch_tokens=1000"),
    (["parallel.tp=3"], "parallel.tp=3"),
    (["deepspeed.stage=4"], "deepspeed.stage=4"),
    (["logging.wandb.mode=sometimes"], "logging.wandb.mode='sometimes'"),
    (["trainer.mode=recurrent"], "trainer.mode='recurrent'"),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size=0"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.decay=exp"], "optim.decay='exp'"),
    (["deepspeed=zero1", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer"),
    (["model.n_heads=3"], "model.d_model=256 is not divisible by model.n_heads=3"),
    (["trainer.mode=chunkwise", "trainer.chunk_size=100"], "trainer.seq_len=2048"),
    # non-finite and out-of-range numbers: each would train to a nan loss or hang, not fail
    (["optim.weight_decay=nan"], "optim.weight_decay=nan: must be a finite number >= 0"),
    (["optim.lr=inf"], "optim.lr=inf: must be a finite number > 0"),
    (["optim.grad_clip=nan"], "optim.grad_clip=nan"),
    (["optim.min_lr_ratio=nan"], "optim.min_lr_ratio=nan"),
    (["parallel.timeout_minutes=0"], "parallel.timeout_minutes=0: must be a finite number > 0"),
    (["trainer.gc_every=-1"], "trainer.gc_every=-1: must be a finite number >= 0"),
    (["logging.peak_tflops=-1"], "logging.peak_tflops=-1"),
    (["optim.decay_steps=-5"], "optim.decay_steps=-5: must be > optim.warmup_steps"),
    (["model.norm_eps=-1"], "model.norm_eps=-1"),
    (["model.head_norm_eps=nan"], "model.head_norm_eps=nan"),
    (["model.rope_base=0"], "model.rope_base=0"),
    (["trainer.compile=true", "trainer.activation_memory_budget=1.5"],
     "trainer.activation_memory_budget=1.5: must be a share of the activations in [0, 1]"),
    (["trainer.compile=true", "trainer.activation_memory_budget=nan"], "trainer.activation_memory_budget=nan"),
    (["trainer.activation_memory_budget=0.5"], "trainer.activation_memory_budget=0.5: needs trainer.compile=true"),
    (["trainer.compile=true", "trainer.activation_memory_budget=0.5", "trainer.activation_checkpointing=full"],
     "trainer.activation_memory_budget=0.5: acts only on blocks without activation checkpointing"),
    (["trainer.compile_tuning=coordinate_descent"],
     "trainer.compile_tuning='coordinate_descent': needs trainer.compile=true"),
    (["trainer.compile_pdl=true"], "trainer.compile_pdl=True: needs trainer.compile=true"),
    (["trainer.residual_dtype=bf16", "trainer.precision=fp32"],
     "trainer.residual_dtype='bf16': needs a bf16 precision"),
    (["trainer.residual_dtype=fp16"], "trainer.residual_dtype"),
    (["trainer.float8_fast_accum=all"], "trainer.float8_fast_accum='all': needs trainer.float8"),
    (["trainer.float8=tensorwise", "trainer.float8_fast_accum=grad_weight"], "trainer.float8_fast_accum"),
])
def test_impossible_values_are_named(overrides, key):
    assert key in _error(overrides)


@pytest.mark.parametrize("overrides,message", [
    (["model.n_heads=2"], "parallel.tp=4: does not divide model.n_heads=2"),
    (["model.ffn_dim=1002"], "parallel.tp=4 does not divide model.ffn_dim=1002"),
    (["model.vocab_size=1001"], "parallel.tp=4 does not divide model.vocab_size=1001"),
])
def test_tensor_parallel_size_must_divide_the_split_dimensions(monkeypatch, overrides, message):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert message in _error(["parallel.tp=4", "trainer.global_batch_tokens=16384", *overrides])


def test_batch_not_divisible_by_data_parallel_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    msg = _error(["trainer.global_batch_tokens=32768", "trainer.seq_len=2048", "trainer.micro_batch_size=8"])
    assert "trainer.global_batch_tokens=32768" in msg and "8 x 2048 x 3" in msg


def test_gradient_accumulation_follows_from_batch_keys():
    cfg = load_config([*SYN, "trainer.global_batch_tokens=65536", "trainer.seq_len=1024",
                       "trainer.micro_batch_size=4"])
    assert batch_layout(cfg.parallel, cfg.trainer, world_size=2) == {
        "dp_size": 2, "tp_size": 1, "cp_size": 1, "grad_accum": 8, "global_batch_seqs": 64}


def test_launcher_arguments_are_not_overrides():
    import os
    from unittest import mock

    # split_argv sets LOCAL_RANK as the launcher would: not for the rest of this pytest process
    # (lm-eval's simple_evaluate, for one, returns nothing where LOCAL_RANK is not 0)
    with mock.patch.dict(os.environ):
        opts, ov = split_argv(["--local_rank=1", "a=1", "--config-name", "x", "b=2"])
        assert ov == ["a=1", "b=2"] and opts["config_name"] == "x"
        opts, ov = split_argv(["--local_rank", "0", "c=3"])
        assert ov == ["c=3"]


def test_cli_exits_2_naming_the_key_before_touching_devices():
    proc = subprocess.run([sys.executable, "-m", "retnet_train", "trainer.data_source=synthetic",
                           "trainer.global_batch_tokens=100"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "trainer.global_batch_tokens=100" in proc.stderr
    assert "deepspeed" not in proc.stdout.lower()  # failed before DeepSpeed started


def test_cli_prints_the_composed_config():
    proc = subprocess.run([sys.executable, "-m", "retnet_train", "--cfg", "job", "experiment=tiny_cpu",
                           "trainer.data_source=synthetic"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "name: tiny_cpu" in proc.stdout


def _config_error_run(tmp_path, override: str, message: str) -> None:
    """A tiny_cpu training run with `override` stops at start-up: exit 2, `message`, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "retnet_train", "experiment=tiny_cpu", override,
                           "trainer.max_steps=1", f"run_dir={tmp_path}"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]


def test_cuda_device_on_a_machine_without_cuda_is_named(tmp_path):
    """Checked where the device is chosen (a config for a GPU cluster still composes on a CPU host)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    _config_error_run(tmp_path, "trainer.device=cuda", "error: trainer.device=cuda: CUDA is not available")


@pytest.mark.parametrize("nccl, cuda, missing", [(False, False, "no NCCL in its torch build and no CUDA GPU"),
                                                 (True, False, "no CUDA GPU"),
                                                 (False, True, "no NCCL in its torch build")])
def test_nccl_backend_without_nccl_or_cuda_names_the_key(monkeypatch, nccl, cuda, missing):
    import torch

    from retnet_train.parallel.groups import check_backend

    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    expected = f"parallel.backend=nccl needs NCCL and a CUDA GPU; this machine has {missing} " \
               "(use parallel.backend=gloo or auto)"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        check_backend("nccl")


def test_backend_check_passes_nccl_with_both_and_other_backends_always(monkeypatch):
    import torch

    from retnet_train.config import Backend
    from retnet_train.parallel.groups import check_backend

    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_backend(Backend.nccl)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for backend in ("gloo", "auto", Backend.gloo, Backend.auto):  # auto picks nccl only on CUDA
        check_backend(backend)


def test_nccl_backend_on_a_machine_without_nccl_is_named(tmp_path):
    """Checked before the process group starts (torch's own error does not name the key)."""
    import torch
    import torch.distributed as dist

    if dist.is_nccl_available() and torch.cuda.is_available():
        pytest.skip("needs a machine without NCCL or CUDA")
    _config_error_run(tmp_path, "parallel.backend=nccl", "error: parallel.backend=nccl needs NCCL and a CUDA GPU")
