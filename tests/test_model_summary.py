"""FLOPs and decoding-memory arithmetic against hand counts; the summary command."""

import subprocess
import sys

import pytest
import torch

from retnet_train.model import build_model, load_preset
from retnet_train.model.flops import kv_cache_bytes, matmul_params, recurrent_state_bytes, training_flops_per_token


def test_matmul_params_equal_the_linear_weights():
    for name in ("retnet_tiny", "transformer_tiny"):
        for ffn in ("gelu", "glu"):
            model = build_model(name, ffn_type=ffn)
            linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
            assert matmul_params(model.config) == linear


def test_flops_and_memory_of_retnet_6_7b():
    cfg = load_preset("retnet_6.7b")
    # one [16 heads, 256, 512] bf16 state per layer, 32 layers
    assert recurrent_state_bytes(cfg) == 32 * 16 * 256 * 512 * 2 == 128 * 2**20
    # keys + values, 32 layers, 8192 tokens, 4096 channels, bf16
    assert kv_cache_bytes(load_preset("transformer_6.7b"), 8192) == 2 * 32 * 8192 * 4096 * 2
    # 6N rule plus the token-mixing term: within 5% of 6 x params at T=2048
    assert abs(training_flops_per_token(cfg, 2048) / (6 * 6.705e9) - 1) < 0.05


def test_summary_command_prints_the_figures():
    out = subprocess.run([sys.executable, "-m", "retnet_train.model.summary", "model=retnet_6.7b", "context=8192"],
                         capture_output=True, text=True, check=True).stdout
    assert "6.705 B" in out and "128.0 MiB" in out and "4.000 GiB" in out and "32.0x" in out


def test_summary_command_rejects_unknown_arguments():
    res = subprocess.run([sys.executable, "-m", "retnet_train.model.summary", "model=retnet_tiny", "colour=red"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "bad: ['colour']" in res.stderr and "usage:" in res.stderr


@pytest.mark.parametrize("arg", ["context=-5", "context=abc", "seq_len=0"])
def test_summary_command_names_a_bad_size(arg):
    res = subprocess.run([sys.executable, "-m", "retnet_train.model.summary", "model=retnet_tiny", arg],
                         capture_output=True, text=True)
    key, value = arg.split("=")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"error: {key}={value!r} must be a whole number >= 1" in res.stderr
