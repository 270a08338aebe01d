"""Retention through our own Triton kernels (constant decay gamma per head), a drop-in for the
torch forms in ../retention.py and for fla_retention.py; forward and backward, varlen, decoding.

Contract (as the torch forms): q, k [B, T, H, d_k], v [B, T, H, d_v] (bf16, fp16 or fp32; keys
already scaled by 1/sqrt(d_k): nothing is scaled here), log_gamma [H] (on q's device, as the model
keeps it: a CPU tensor is copied to the GPU at every call, a copy that waits for the GPU), optional
incoming state [B, H, d_k, d_v]; returns (o [B, T, H, d_v] in the input dtype, final state
[B, H, d_k, d_v] fp32 or None). With cu_seqlens (int32 [N + 1], offsets into a B = 1 packed row),
the state restarts at each boundary (from state[n] or 0) and states are [N, H, d_k, d_v].

Gradients flow to q, k, v and the incoming state, and from the final state; there is no decay
gradient (the decays are fixed). The kernels and their design: retention_chunk_kernels.py.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..config import RetentionKeep
from ..flops import chunk_retention_flops
from . import retention_launch as L
from .decode_step import log2_decays
from .retention_launch import MAX_DK, MAX_DV, Tuning

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def usable(x: Tensor) -> bool:
    """True where these kernels run on x: a CUDA/ROCm tensor, or a CPU tensor under Triton's
    interpreter (TRITON_INTERPRET=1 set before triton was imported; tests only)."""
    if x.dtype not in _DTYPES:
        return False
    if x.is_cuda:  # ROCm tensors are "cuda" too
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, mode: str, state: Tensor | None = None,
              need_state: bool = False, cu_seqlens: Tensor | None = None, keep: str = "none"):
    """fla_retention.retention's contract. "recurrent" without gradients and without cu_seqlens
    runs the token-by-token kernel; otherwise both modes run the chunkwise kernels (same result).
    keep (model.retention_keep: none | states | scores | both): what the forward keeps for the
    backward instead of it recomputing them."""
    if mode not in ("chunkwise", "recurrent"):
        raise ValueError(f"unknown retention mode {mode!r}; the Triton kernels do chunkwise or recurrent")
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, state))
    if mode == "recurrent" and not grads and cu_seqlens is None:
        return recurrent(q, k, v, log_gamma, state, need_state)
    return chunk_retention(q, k, v, log_gamma, state, need_state, cu_seqlens, tuning=keep_tuning(keep))


# read once here: iterating an Enum class inside a traced block is a graph break for dynamo (torch
# 2.11), and inside a checkpointed block one graph break runs the whole block eagerly
_KEEP_CHOICES = RetentionKeep.values()


def keep_tuning(keep: str) -> Tuning | None:
    """The default tuning with model.retention_keep's choice (None: nothing kept, the defaults)."""
    if keep not in _KEEP_CHOICES:
        raise ValueError(f"model.retention_keep={keep!r} is not one of {list(_KEEP_CHOICES)}")
    if keep == "none":
        return None
    return dataclasses.replace(L.default_tuning(rocm=torch.version.hip is not None),
                               keep_states=keep in ("states", "both"), keep_scores=keep in ("scores", "both"))


def chunk_retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, state: Tensor | None = None,
                    need_state: bool = False, cu_seqlens: Tensor | None = None, chunk_size: int = 64,
                    tuning: Tuning | None = None):
    """Chunkwise retention with autograd. Heads wider than one kernel call takes (d_k > 256,
    d_v > 512) are split: retention is a sum over key slices and independent per value column."""
    B, T, H, DK = _check(q, k, v, log_gamma, state, cu_seqlens)
    DV = v.shape[-1]
    tuning = L.with_tuning(tuning, chunk_size)
    if DK > MAX_DK or DV > MAX_DV:
        return _split_heads(q, k, v, log_gamma, state, need_state, cu_seqlens, tuning)
    lg2 = log2_decays(log_gamma, q.device)
    k, v = k.to(q.dtype), v.to(q.dtype)
    init = None if state is None else state.float().contiguous()
    o, final, _, _ = torch.ops.retnet.retention_chunk(q, k, v, lg2, init, cu_seqlens, need_state,
                                                      _tuning_ints(tuning))
    return o, (final if need_state else None)


def recurrent(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, state: Tensor | None = None,
              need_state: bool = True):
    """Token-by-token retention, no autograd: (o [B, T, H, d_v], final state or None); `state` is
    left as it was."""
    B, T, H, DK = _check(q, k, v, log_gamma, state, None)
    init = None if state is None else state.float().contiguous()
    final = torch.empty(B, H, DK, v.shape[-1], dtype=torch.float32, device=q.device) if need_state else None
    o, launch = L.recurrent(q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous(),
                            log2_decays(log_gamma, q.device), init, final)
    launch()
    return o, final


def recurrent_step(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, state: Tensor) -> Tensor:
    """One decoding step: q, k [B, H, d_k], v [B, H, d_v]; state [B, H, d_k, d_v] fp32 is updated
    IN PLACE (S <- gamma S + k^T v); returns o = q S [B, H, d_v] in q's dtype."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"recurrent_step updates the state in place: it must be contiguous float32, "
                         f"got {state.dtype} (contiguous={state.is_contiguous()})")
    q4, k4, v4 = (x.unsqueeze(1) for x in (q, k, v))
    _check(q4, k4, v4, log_gamma, state, None)
    o = _recurrent_step_op(q4.contiguous(), k4.to(q.dtype).contiguous(), v4.to(q.dtype).contiguous(),
                           log2_decays(log_gamma, q.device), state)
    return o.squeeze(1)


# a torch.library op, so torch.compile (the inference engine's compiled step) calls the kernel as
# one opaque in-place op instead of tracing into Triton's launcher
@torch.library.custom_op("retnet::retention_recurrent_step", mutates_args=("state",))
def _recurrent_step_op(q: Tensor, k: Tensor, v: Tensor, lg2: Tensor, state: Tensor) -> Tensor:
    o, launch = L.recurrent(q, k, v, lg2, state, state)
    launch()
    return o


@_recurrent_step_op.register_fake
def _(q, k, v, lg2, state):
    return torch.empty_like(v)


# ---- the chunk form as a custom op ---------------------------------------------------------------
# A torch.library op rather than an autograd.Function: torch.compile's partitioner treats the
# Triton launches an autograd.Function traces into as outputs to keep, so a fully checkpointed
# compiled block kept q, k, v and o of every layer (128k tokens ran out of 80 GB; eager fits in
# 47 GiB). An op it can recompute like any other; selective checkpointing keeps its output by name
# (model/checkpointing.py). Its arguments are tensors and ints: the Tuning travels as _tuning_ints.

_TUNING_FIELDS = ("chunk", "segment_chunks", "block_z", "block_k", "num_warps", "num_stages", "states_stages",
                  "states_bt", "score_block", "keep_states", "keep_scores")


# the on/off knobs, which travel as 0/1 (with `from __future__ import annotations` a field's type is its text)
_TUNING_FLAGS = tuple(f.name for f in dataclasses.fields(Tuning) if f.type == "bool")


def _tuning_ints(t: Tuning) -> list[int]:
    """Tuning -> ints (None: -1; state_block: two more ints at the end)."""
    values = [getattr(t, name) for name in _TUNING_FIELDS] + list(t.state_block or (None, None))
    return [-1 if x is None else int(x) for x in values]


def _tuning_of(ints: list[int]) -> Tuning:
    fields = {name: (None if x == -1 else x) for name, x in zip(_TUNING_FIELDS, ints)}
    for flag in _TUNING_FLAGS:
        fields[flag] = bool(fields[flag])
    block = ints[len(_TUNING_FIELDS):]
    return Tuning(**fields, state_block=None if block[0] == -1 else tuple(block))


def _layout(q: Tensor, cu_seqlens: Tensor | None, tuning: Tuning) -> L.Layout:
    return L.make_layout(q.shape[0], q.shape[1], cu_seqlens, tuning, q.device)


def _flat(x: Tensor) -> Tensor:
    """[B, T, H, D] -> [B * T, H, D]: the batch folds into time (the kernels' layout)."""
    return x.contiguous().view(-1, *x.shape[2:])


def _none_as_empty(x: Tensor | None, like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("retnet::retention_chunk", mutates_args=())
def _chunk_op(q: Tensor, k: Tensor, v: Tensor, lg2: Tensor, init: Tensor | None, cu_seqlens: Tensor | None,
              need_final: bool, tuning: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """o [B, T, H, d_v] in v's dtype; the final state [N, H, d_k, d_v] fp32; the segment states and
    the scores the backward reuses (Tuning.keep_states / keep_scores). Each absent one is empty."""
    t = _tuning_of(tuning)
    o, final, states, scores = L.forward(_flat(q), _flat(k), _flat(v), lg2, init, need_final,
                                         _layout(q, cu_seqlens, t), t)
    return (o.view(v.shape), _none_as_empty(final, q), states if t.keep_states else _none_as_empty(None, q),
            scores if t.keep_scores else _none_as_empty(None, q))


@_chunk_op.register_fake
def _(q, k, v, lg2, init, cu_seqlens, need_final, tuning):
    t = _tuning_of(tuning)
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    lay = _layout(q, cu_seqlens, t)  # the real op's layout, on fake tensors: its sizes
    final = q.new_empty(lay.N, H, DK, DV, dtype=torch.float32) if need_final else None
    states = q.new_empty(lay.n_seg, H, DK, DV) if t.keep_states else None
    scores = q.new_empty(B * T, H, lay.S) if t.keep_scores else None
    # contiguous, as the kernels write it (empty_like would copy a permuted v's strides)
    return v.new_empty(v.shape), *(_none_as_empty(x, q) for x in (final, states, scores))


@torch.library.custom_op("retnet::retention_chunk_backward", mutates_args=())
def _chunk_backward_op(do: Tensor, dfinal: Tensor | None, q: Tensor, k: Tensor, v: Tensor, lg2: Tensor,
                       init: Tensor | None, cu_seqlens: Tensor | None, states: Tensor | None,
                       scores: Tensor | None, need_dinit: bool, tuning: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv in the inputs' dtype and the incoming state's gradient (empty unless need_dinit)."""
    t = _tuning_of(tuning)
    dq, dk, dv, dinit = L.backward(_flat(q), _flat(k), _flat(v), lg2, init, _flat(do.to(v.dtype)), dfinal,
                                   need_dinit, _layout(q, cu_seqlens, t), t, states=states, scores=scores)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), _none_as_empty(dinit, q)


@_chunk_backward_op.register_fake
def _(do, dfinal, q, k, v, lg2, init, cu_seqlens, states, scores, need_dinit, tuning):
    dinit = init.new_empty(init.shape) if need_dinit else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dinit


def _chunk_flops(q_shape, v_shape, tuning: list[int]) -> int:
    """The model's chunk-form count (model/flops.py), B rows of T tokens, for the compiler's cost
    estimates, e.g. what trainer.activation_memory_budget recomputes first: without a formula an
    opaque op counts as free. A packed varlen row counts as one sequence."""
    B, T, H, K = q_shape
    return B * H * chunk_retention_flops(T, K, v_shape[-1], _tuning_of(tuning).chunk)


@register_flop_formula(torch.ops.retnet.retention_chunk)
def _(q, k, v, lg2, init, cu_seqlens, need_final, tuning, out_shape=None, **kwargs) -> int:
    return _chunk_flops(q, v, tuning)


@register_flop_formula(torch.ops.retnet.retention_chunk_backward)
def _(do, dfinal, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * _chunk_flops(q, v, args[-1])  # the backward counts twice the forward, as in model/flops.py


def _setup_context(ctx, inputs, output):
    q, k, v, lg2, init, cu_seqlens, _, tuning = inputs
    _, _, states, scores = output
    t = _tuning_of(tuning)
    ctx.tuning = tuning
    # as the autograd.Function did: no zero-filled gradients of the kept states and scores (nothing
    # flows back through them) or of an unused output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, lg2, init, cu_seqlens, states if t.keep_states else None,
                          scores if t.keep_scores else None)


def _backward(ctx, do, dfinal, _dstates, _dscores):
    q, k, v, lg2, init, cu_seqlens, states, scores = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do
    dfinal = dfinal.float().contiguous() if dfinal is not None and dfinal.numel() else None
    need_dinit = init is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dinit = torch.ops.retnet.retention_chunk_backward(do, dfinal, q, k, v, lg2, init, cu_seqlens,
                                                                  states, scores, need_dinit, ctx.tuning)
    return dq, dk, dv, None, (dinit if need_dinit else None), None, None, None


_chunk_op.register_autograd(_backward, setup_context=_setup_context)


def _split_heads(q, k, v, log_gamma, state, need_state, cu_seqlens, tuning):
    """o = sum over key slices of retention(q_s, k_s, v); value columns are independent."""
    DK, DV = q.shape[-1], v.shape[-1]
    k_cuts = _cuts(DK, MAX_DK)
    v_cuts = _cuts(DV, MAX_DV)
    outs, finals = [], []
    for v0, v1 in v_cuts:
        o_sum, rows = None, []
        for k0, k1 in k_cuts:
            s = None if state is None else state[:, :, k0:k1, v0:v1]
            o, f = chunk_retention(q[..., k0:k1], k[..., k0:k1], v[..., v0:v1], log_gamma, s, need_state,
                                   cu_seqlens, tuning.chunk, tuning)
            o_sum = o.float() if o_sum is None else o_sum + o.float()
            rows.append(f)
        outs.append(o_sum.to(q.dtype))
        finals.append(torch.cat(rows, dim=2) if need_state else None)
    return torch.cat(outs, dim=-1), (torch.cat(finals, dim=3) if need_state else None)


def _cuts(n: int, limit: int) -> list[tuple[int, int]]:
    pieces = math.ceil(n / limit)
    step = math.ceil(n / pieces)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _check(q, k, v, log_gamma, state, cu_seqlens):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, T, H, d_k] and v [B, T, H, d_v]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, DK = q.shape
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported by the Triton retention kernels (fp16, bf16, fp32)")
    if log_gamma.shape != (H,):
        raise ValueError(f"log_gamma must be [H] = [{H}], got {tuple(log_gamma.shape)}")
    if cu_seqlens is not None:
        if B != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens needs a packed row (B = 1, got {B}) and [N + 1] offsets "
                             f"(got shape {tuple(cu_seqlens.shape)})")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    n_states = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if state is not None and tuple(state.shape) != (n_states, H, DK, v.shape[-1]):
        raise ValueError(f"state must be [{n_states}, {H}, {DK}, {v.shape[-1]}], got {tuple(state.shape)}")
    return B, T, H, DK
