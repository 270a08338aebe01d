"""Fast GPU paths: retention (fla's kernels, our own Triton kernels), the fused head norm + gate, the
linear cross-entropy. Each has a pure-torch fallback and is tested against it.

Which ones a model uses is the model config key `kernels` (auto | torch | fla | triton), resolved
once when the model is built (`resolve_kernels`) and stored on it as `model.kernels`; nothing here
reads an environment variable.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from ..config import KERNELS as KERNEL_CHOICES
from ..config import ModelConfigError

log = logging.getLogger(__name__)

# What `auto` picks on an NVIDIA GPU, best first. It follows the measured figures in
# bench/RESULTS.md: our own chunkwise kernels (kernels/retention_triton.py) are about 2x fla's
# chunk_simple_gla forward + backward at the presets' heads (H200, 2026-12-04); fla is the fallback
# where ours do not import.
AUTO_ORDER_CUDA = ("triton", "fla", "torch")
# On ROCm fla is never chosen (not shown to work there); our own kernels are compiled for gfx90a.
AUTO_ORDER_ROCM = ("triton", "torch")


class KernelChoiceError(ModelConfigError):
    """model.kernels names kernels that cannot run where the model is built; the message says why."""


def triton_interpreted() -> bool:
    # TRITON_INTERPRET=1 (tests only) runs Triton kernels on CPU tensors; triton reads it at import
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _import_error(module: str) -> str | None:
    """None if `module` imports, else why not (one line)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # missing package, or a triton/CUDA mismatch at import
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def available(choice: str, device: torch.device) -> str | None:
    """None if kernels `choice` can run on `device`, else the reason it cannot."""
    if choice == "torch":
        return None
    on_gpu = device.type == "cuda"
    if choice == "fla":
        if not on_gpu:
            return f"fla needs CUDA (the model is built on {device.type})"
        if torch.version.hip is not None:
            return "fla is not supported on ROCm (use kernels=triton or torch)"
        why = _import_error("fla.ops.simple_gla")
        return f"fla-core does not import ({why}); pip install -e '.[gpu]'" if why else None
    if choice == "triton":
        if not on_gpu and not triton_interpreted():
            return f"triton kernels need a GPU (the model is built on {device.type}; tests set TRITON_INTERPRET=1)"
        why = _import_error("retnet_train.model.kernels.retention_triton")
        return f"our Triton retention kernels are not importable ({why})" if why else None
    return f"unknown kernels {choice!r}"


def resolve_kernels(choice: str, device: torch.device | str | None = None) -> str:
    """The concrete kernels (torch | fla | triton) for a model built on `device` (default: the
    current default device; a meta build is planned for this machine's accelerator)."""
    if choice not in KERNEL_CHOICES:
        raise KernelChoiceError(f"model.kernels={choice!r} is not one of {list(KERNEL_CHOICES)}")
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "meta":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "auto":
        if device.type != "cuda":
            return "torch"
        order = AUTO_ORDER_ROCM if torch.version.hip is not None else AUTO_ORDER_CUDA
        return next(c for c in order if available(c, device) is None)
    why = available(choice, device)
    if why:
        raise KernelChoiceError(f"model.kernels={choice!r}: {why}")
    return choice
