"""Retention through fla-core's Triton kernels (simple GLA with a per-head constant decay).

fla's own `chunk_retention` derives each head's decay from the *local* head count, which is wrong
once tensor parallelism splits the heads; `chunk_simple_gla` takes the decays (`g_gamma`, log
gamma per head) from us, computed from global head indices by `head_log_decays`.

Chosen by model.kernels=fla (or auto on NVIDIA, see kernels/__init__.py). The chunk form, the one
training runs, is a torch.library custom op (`retnet::retention_fla_chunk`) over fla's forward and
backward functions: torch.compile then keeps one graph around it (fla's public function is marked
`torch.compiler.disable`, a graph break in every block), and selective activation checkpointing
keeps its output. Those functions are fla internals; they are used for the fla versions this was
tested with (TESTED_FLA), any other version runs fla's public function instead.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

TESTED_FLA = ("0.6.",)  # fla-core versions whose chunk_simple_gla_fwd/_bwd signatures this file follows


@functools.lru_cache(maxsize=1)
def _fla():
    """fla's entry points; the internal forward/backward only for a tested version."""
    import fla
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    internals = None
    if str(getattr(fla, "__version__", "")).startswith(TESTED_FLA):
        from fla.ops.simple_gla.chunk import chunk_simple_gla_bwd, chunk_simple_gla_fwd
        from fla.ops.utils.constant import RCP_LN2

        internals = (chunk_simple_gla_fwd, chunk_simple_gla_bwd, RCP_LN2)
    return chunk_simple_gla, fused_recurrent_simple_gla, internals


def usable(x: Tensor) -> bool:
    return x.is_cuda and x.dtype != torch.float64


def retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, mode: str,
              state: Tensor | None = None, need_state: bool = False, cu_seqlens: Tensor | None = None,
              keep: str = "none"):
    """Same contract as the torch forms: q, k [B, T, H, K], v [B, T, H, V], state [B, H, K, V] (fp32).
    Keys arrive pre-scaled by 1/sqrt(d_k), so the kernels must not scale again (scale=1). keep
    (model.retention_keep) is the triton kernels' choice: fla's backward recomputes what it needs."""
    chunk, fused_recurrent, internals = _fla()
    g_gamma = log_gamma.to(device=q.device, dtype=torch.float32)
    init = None if state is None else state.float()
    if mode == "chunkwise" and internals is not None and cu_seqlens is None:
        o, final = torch.ops.retnet.retention_fla_chunk(q, k, v, g_gamma, init, need_state)
        return o, (final if need_state else None)
    fn = fused_recurrent if mode == "recurrent" else chunk
    return fn(q, k, v, g_gamma=g_gamma, scale=1.0, initial_state=init, output_final_state=need_state,
              cu_seqlens=cu_seqlens)


# ---- the chunk form as a custom op ---------------------------------------------------------------

@torch.library.custom_op("retnet::retention_fla_chunk", mutates_args=())
def _chunk_op(q: Tensor, k: Tensor, v: Tensor, g_gamma: Tensor, initial_state: Tensor | None,
              output_final_state: bool) -> tuple[Tensor, Tensor]:
    """o [B, T, H, V] in q's dtype; the final state [B, H, K, V] fp32, or an empty tensor."""
    fwd, _, rcp_ln2 = _fla()[2]
    with torch.cuda.device(q.device):
        # fla's kernels use exp2: its autograd function pre-scales the log decays by 1/ln 2, as here
        o, ht = fwd(q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), g=None, g_gamma=g_gamma * rcp_ln2,
                    scale=1.0, initial_state=initial_state, output_final_state=output_final_state)
    return o.to(q.dtype), (ht if ht is not None else q.new_empty(0, dtype=torch.float32))


@_chunk_op.register_fake
def _(q, k, v, g_gamma, initial_state, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    final = q.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(B, T, H, V), final


def _setup_context(ctx, inputs, output):
    q, k, v, g_gamma, initial_state, _ = inputs
    ctx.has_initial_state = initial_state is not None
    ctx.save_for_backward(q, k, v, g_gamma, initial_state)


@torch.library.custom_op("retnet::retention_fla_chunk_backward", mutates_args=())
def _chunk_backward_op(do: Tensor, dht: Tensor | None, q: Tensor, k: Tensor, v: Tensor, g_gamma: Tensor,
                       initial_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv and the incoming state's gradient (empty without an incoming state)."""
    _, bwd, rcp_ln2 = _fla()[2]
    with torch.cuda.device(q.device):
        dq, dk, dv, _, dh0 = bwd(q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), g=None,
                                 g_gamma=g_gamma * rcp_ln2, initial_state=initial_state, do=do.contiguous(),
                                 dht=dht, scale=1.0)
    dh0 = dh0 if initial_state is not None else q.new_empty(0, dtype=torch.float32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dh0


@_chunk_backward_op.register_fake
def _(do, dht, q, k, v, g_gamma, initial_state):
    dh0 = torch.empty_like(initial_state) if initial_state is not None else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dh0


def _backward(ctx, do, dht):
    # an op of its own: torch.compile traces this function with fake tensors, which fla cannot take
    q, k, v, g_gamma, initial_state = ctx.saved_tensors
    dht = dht if dht is not None and dht.numel() else None
    dq, dk, dv, dh0 = torch.ops.retnet.retention_fla_chunk_backward(do, dht, q, k, v, g_gamma, initial_state)
    return dq, dk, dv, None, (dh0 if ctx.has_initial_state else None), None


_chunk_op.register_autograd(_backward, setup_context=_setup_context)
