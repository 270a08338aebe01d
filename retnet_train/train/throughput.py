"""Tokens/s, model FLOPs utilisation and memory."""

from __future__ import annotations

import os
import resource
import sys

import torch

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor data sheets).
PEAK_TFLOPS = [("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("mi300", 1307.0),
               ("mi250", 191.5),  # per GCD (an MI250X card is two devices)
               ("mi210", 181.0), ("l40", 181.0), ("a10", 125.0), ("v100", 125.0)]


def peak_flops_per_device(device: torch.device, configured_tflops: float | None = None) -> float:
    """FLOP/s one device can do; CPU: cores x 2.5 GHz x fp32 FLOP/cycle of its widest FMA (two FMA
    units: 64 with AVX-512, 32 with AVX2), rough."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, tflops in PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12
        return 100e12
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, torch.get_num_threads()) * 2.5e9 * _cpu_fp32_flops_per_cycle()


def _cpu_fp32_flops_per_cycle() -> int:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return 32
    return 64 if " avx512f" in flags else 32


def flops_per_token(model_cfg, seq_len: int, mode: str = "parallel") -> float:
    """Training FLOPs (fwd + bwd) per token of the form that trains, from the model package."""
    from retnet_train.model.flops import training_flops_per_token

    return float(training_flops_per_token(model_cfg, seq_len, mode=mode))


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (CUDA), or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
