"""Retention through fla-core's Triton kernels (simple GLA with a per-head constant decay).

fla's own `chunk_retention` derives each head's decay from the *local* head count, which is wrong
once tensor parallelism splits the heads; `chunk_simple_gla` takes the decays (`g_gamma`, log
gamma per head) from us, computed from global head indices by `head_log_decays`.

Used only on CUDA with Triton and fla importable; ROCm stays on the torch path until shown to
work there. Set RETNET_DISABLE_FLA=1 to force the torch path (for A/B tests).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def _kernels():
    if os.environ.get("RETNET_DISABLE_FLA") == "1" or torch.version.hip is not None:
        return None
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except Exception:  # fla or triton missing, or they fail to import on this platform
        return None
    return chunk_simple_gla, fused_recurrent_simple_gla


def usable(x: Tensor) -> bool:
    return x.is_cuda and x.dtype != torch.float64 and _kernels() is not None


def retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, mode: str,
              state: Tensor | None = None, need_state: bool = False):
    """Same contract as the torch forms: q, k [B, T, H, K], v [B, T, H, V], state [B, H, K, V]."""
    chunk, fused_recurrent = _kernels()
    fn = fused_recurrent if mode == "recurrent" else chunk
    g_gamma = log_gamma.to(device=q.device, dtype=torch.float32)
    init = None if state is None else state.float()
    # keys arrive pre-scaled by 1/sqrt(d_k), so the kernel must not scale again
    o, final = fn(q, k, v, g_gamma=g_gamma, scale=1.0, initial_state=init, output_final_state=need_state)
    return o, final
