"""Selective activation checkpointing's policy: what a checkpointed region keeps for its backward.

Used by the blocks' `selective` mode (lm.run_block) and by the compiled gated-norm projection
(kernels/norm_gate.py), whose region must recompute the gated output but not the projection.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


@functools.lru_cache(maxsize=1)
def _saved_ops() -> frozenset:
    """Ops whose outputs are kept: matmuls (projections, FFN, the torch retention forms' batched
    matmuls, which are the expensive intra-chunk part; _scaled_mm: trainer.float8's fp8 projections)
    and attention kernels."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward"]
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # custom retention kernels register themselves as torch.library ops named retnet::retention*
    if op in _saved_ops() or op.name().startswith("retnet::retention"):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def keep_matmul_outputs():
    """`context_fn` of torch.utils.checkpoint: keep matmul and retention outputs, recompute the rest."""
    return create_selective_checkpoint_contexts(_keep_matmuls)
