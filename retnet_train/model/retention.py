"""Retention (RetNet paper, section 2) in its three equivalent forms, in plain PyTorch.

Notation (per head, decay gamma, state S of shape [d_k, d_v]):
    recurrent:  S_t = gamma * S_{t-1} + k_t^T v_t,          o_t = q_t S_t
    parallel:   O = (Q K^T * D) V,  D[t, s] = gamma^(t-s) if t >= s else 0
    chunkwise:  parallel inside chunks of C tokens, recurrent across chunks.

All three functions take q, k: [B, T, H, d_k], v: [B, T, H, d_v] (the layout of fla's kernels, so the
fast path needs no transposes), log_gamma: [H], and an optional incoming state [B, H, d_k, d_v]
(what came before these T tokens). They return (o [B, T, H, d_v], final state or None). Keys are
expected pre-scaled (1/sqrt(d_k)) by the caller. The decay masks are built in float32 at least
(float64 for float64 inputs) and cast to the input dtype only at the matmul.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import triton_interpreted
from .retention_state import WindowedState


def head_log_decays(n_heads: int, schedule: str = "paper", head_start: int = 0,
                    head_count: int | None = None) -> Tensor:
    """log(gamma_h) for global heads [head_start, head_start + head_count), float64.

    The one place decays are defined. Tensor-parallel shards pass their slice of global heads, so
    each shard gets the decays its heads have in the unsharded model.
    """
    head_count = n_heads - head_start if head_count is None else head_count
    h = torch.arange(head_start, head_start + head_count, dtype=torch.float64)
    if schedule == "paper":  # gamma_h = 1 - 2^(-5-h)
        return torch.log1p(-torch.pow(2.0, -5.0 - h))
    if schedule == "linspace":  # 1 - gamma spread log-uniformly over [1/512, 1/32], any head count
        frac = h / max(n_heads - 1, 1)
        one_minus = torch.exp(math.log(1 / 32) + frac * (math.log(1 / 512) - math.log(1 / 32)))
        return torch.log1p(-one_minus)
    if schedule == "uniform":  # the paper's "without multi-scale decay" ablation: one gamma for all heads
        return torch.full_like(h, math.log1p(-2.0 ** -5))
    raise ValueError(f"unknown decay schedule {schedule!r}")


def _mask_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def decay_mask(log_gamma: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """D [H, T, T]: gamma^(t-s) on and below the diagonal, 0 above."""
    pos = torch.arange(length, device=log_gamma.device, dtype=dtype)
    diff = pos[:, None] - pos[None, :]
    causal = diff >= 0
    # clamp before exp so the masked upper triangle cannot overflow to inf (inf * 0 = nan in backward)
    exponent = diff.clamp(min=0)[None] * log_gamma.to(dtype)[:, None, None]
    return torch.exp(exponent) * causal


def document_ids(doc_starts: Tensor) -> Tensor:
    """doc_starts bool [B, T] -> the document index of each token [B, T] (0: the document the
    incoming state belongs to, continued from before these tokens)."""
    return doc_starts.long().cumsum(dim=1)


def parallel_retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor,
                       state: Tensor | None = None, need_state: bool = False, doc_starts: Tensor | None = None):
    """The parallel form: one masked matmul over all T tokens; O(T^2) time and memory. With
    doc_starts [B, T] (true at a document's first token) a token sees only its own document."""
    B, T, H, _ = q.shape
    mdt = _mask_dtype(q)
    lg = log_gamma.to(device=q.device, dtype=mdt)
    D = decay_mask(lg, T, mdt).to(q.dtype)  # [H, T, T]
    scores = torch.einsum("bthk,bshk->bhts", q, k) * D
    doc = None if doc_starts is None else document_ids(doc_starts)
    if doc is not None:
        scores = scores * (doc[:, :, None] == doc[:, None, :])[:, None].to(scores.dtype)  # [B, 1, T, T]
    o = torch.einsum("bhts,bshv->bthv", scores, v)
    pos = torch.arange(T, device=q.device, dtype=mdt)
    if state is not None:
        o = o + past_contribution(q, state, log_gamma, doc_starts)
    new_state = None
    if need_state:
        k_decay = torch.exp((T - 1 - pos)[:, None] * lg[None, :]).to(k.dtype)[None, :, :, None]  # [1, T, H, 1]
        if doc is not None:  # only the last document's tokens reach the final state
            k_decay = k_decay * (doc == doc[:, -1:])[:, :, None, None].to(k.dtype)
        new_state = torch.einsum("bthk,bthv->bhkv", k * k_decay, v)
        if state is not None:
            carried = state.to(new_state.dtype) * torch.exp(T * lg).to(new_state.dtype)[None, :, None, None]
            if doc is not None:
                carried = carried * (doc[:, -1] == 0)[:, None, None, None].to(carried.dtype)
            new_state = new_state + carried
    return o, new_state


def past_contribution(q: Tensor, state: Tensor, log_gamma: Tensor, doc_starts: Tensor | None = None) -> Tensor:
    """What an incoming state S_in [B, H, d_k, d_v] adds to the outputs of the T tokens after it:
    q_t gamma^(t+1) S_in [B, T, H, d_v], for the tokens still in the incoming document (before the
    first of doc_starts [B, T])."""
    T = q.shape[1]
    mdt = _mask_dtype(q)
    lg = log_gamma.to(device=q.device, dtype=mdt)
    pos = torch.arange(T, device=q.device, dtype=mdt)
    q_decay = torch.exp((pos + 1)[:, None] * lg[None, :]).to(q.dtype)  # [T, H]
    past = torch.einsum("bthk,bhkv->bthv", q * q_decay[None, :, :, None], state.to(q.dtype))
    if doc_starts is not None:
        past = past * (doc_starts.long().cumsum(dim=1) == 0)[:, :, None, None].to(past.dtype)
    return past


def carried_states(summaries: Tensor, log_gamma: Tensor, slice_len: int, resets: Tensor | None = None) -> Tensor:
    """The state entering each of R consecutive slices of one sequence, from what each slice leaves
    when it starts from zero (its `summary`, [R, B, H, d_k, d_v]): slice r receives
    sum_{j<r} gamma^(L (r-1-j)) summary_j, the decay over a whole slice of L tokens being gamma^L;
    resets [R, B] bool (a document starts in slice j) stops the earlier slices' part at slice j.
    -> [R, B, H, d_k, d_v] (slice 0's is zero). fp32; R is small (the context-parallel size)."""
    R = summaries.shape[0]
    decay = torch.exp(slice_len * log_gamma.to(device=summaries.device, dtype=torch.float64))
    decay = decay.to(summaries.dtype)[None, :, None, None]  # [1, H, 1, 1]
    entering = [torch.zeros_like(summaries[0])]
    for j in range(R - 1):
        before = entering[-1] * decay
        if resets is not None:
            before = before * (~resets[j]).to(before.dtype)[:, None, None, None]
        entering.append(before + summaries[j])
    return torch.stack(entering)


def recurrent_retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor,
                        state: Tensor | None = None, need_state: bool = True, doc_starts: Tensor | None = None):
    """The recurrent form: one token at a time, O(1) time and memory per token. A document start
    empties the state before its token."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    gamma = torch.exp(log_gamma.to(device=q.device, dtype=_mask_dtype(q))).to(q.dtype)[None, :, None, None]
    S = q.new_zeros(B, H, K, V) if state is None else state.to(q.dtype)
    outs = []
    for t in range(T):
        if doc_starts is not None:
            S = S * (~doc_starts[:, t])[:, None, None, None].to(S.dtype)
        S = gamma * S + k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, dim=1), (S if need_state else None)


def chunkwise_retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor,
                        state: Tensor | None = None, need_state: bool = False, chunk_size: int = 64,
                        doc_starts: Tensor | None = None):
    """The chunkwise form: parallel inside chunks of C tokens, recurrent across them; any T.

    Full chunks are done batched: the within-chunk part as a [C, C] masked matmul per chunk, the
    cross-chunk part as q times the state entering that chunk. Only the state hand-off between
    chunks is a loop (over T / C steps of [B, H, d_k, d_v] work). A last partial chunk runs the
    parallel form from the state the full chunks left. With doc_starts, a chunk masks its in-chunk
    scores to same-document pairs, hands on only its last document's keys, carries the entering
    state only if no document starts in it, and lets a token read that state only before the
    chunk's first start.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    n = T // C
    if n == 0:
        return parallel_retention(q, k, v, log_gamma, state, need_state, doc_starts)
    mdt = _mask_dtype(q)
    lg = log_gamma.to(device=q.device, dtype=mdt)
    pos = torch.arange(C, device=q.device, dtype=mdt)
    D = decay_mask(lg, C, mdt).to(q.dtype)  # [H, C, C]
    q_decay = torch.exp((pos + 1)[:, None] * lg[None, :]).to(q.dtype)  # [C, H]: gamma^(c+1)
    k_decay = torch.exp((C - 1 - pos)[:, None] * lg[None, :]).to(q.dtype)  # [C, H]: gamma^(C-1-c)
    chunk_decay = torch.exp(C * lg).to(q.dtype)[None, :, None, None]  # [1, H, 1, 1]: gamma^C

    qc = q[:, : n * C].reshape(B, n, C, H, K)
    kc = k[:, : n * C].reshape(B, n, C, H, K)
    vc = v[:, : n * C].reshape(B, n, C, H, V)

    scores = torch.einsum("bnchk,bndhk->bnhcd", qc, kc) * D
    k_weight = k_decay[None, None, :, :, None]  # [1, 1, C, H, 1]
    carry = read = None
    if doc_starts is not None:
        starts = doc_starts[:, : n * C].reshape(B, n, C)
        doc = document_ids(doc_starts)[:, : n * C].reshape(B, n, C)
        scores = scores * (doc[..., :, None] == doc[..., None, :])[:, :, None].to(scores.dtype)
        k_weight = k_weight * (doc == doc[..., -1:])[..., None, None].to(k.dtype)  # the chunk's last document
        carry = (~starts.any(-1)).to(q.dtype)[:, :, None, None, None]  # [B, n, 1, 1, 1]
        read = (starts.long().cumsum(-1) == 0).to(q.dtype)[..., None, None]  # [B, n, C, 1, 1]
    o_inner = torch.einsum("bnhcd,bndhv->bnchv", scores, vc)
    kv = torch.einsum("bnchk,bnchv->bnhkv", kc * k_weight, vc)  # each chunk's own sum

    S = q.new_zeros(B, H, K, V) if state is None else state.to(q.dtype)
    entering = []
    for i in range(n):
        entering.append(S)
        S = chunk_decay * S * (carry[:, i] if carry is not None else 1) + kv[:, i]
    entering = torch.stack(entering, dim=1)  # [B, n, H, K, V]: the state before each chunk
    o_cross = torch.einsum("bnchk,bnhkv->bnchv", qc * q_decay[None, None, :, :, None], entering)
    if read is not None:
        o_cross = o_cross * read
    o = (o_inner + o_cross).reshape(B, n * C, H, V)

    if n * C < T:  # the last, partial chunk
        tail_starts = None if doc_starts is None else doc_starts[:, n * C:]
        o_tail, S_tail = parallel_retention(q[:, n * C:], k[:, n * C:], v[:, n * C:], log_gamma, S, need_state,
                                            tail_starts)
        return torch.cat([o, o_tail], dim=1), S_tail
    return o, (S if need_state else None)


def recurrent_step_in_place(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, state: Tensor,
                            kernels: str = "torch") -> Tensor:
    """One decoding token, q, k [B, 1, H, d_k], v [B, 1, H, d_v], with the fp32 state [B, H, d_k, d_v]
    updated in place (S <- gamma S + k^T v) -> o = q S [B, 1, H, d_v]. With fla or triton kernels
    on a GPU this is our Triton decoding kernel (one read and one write of the state); fla's fused
    recurrent kernel returns a new state instead of updating one."""
    if q.shape[1] != 1 or state.dtype != torch.float32:
        raise ValueError(f"an in-place retention step takes one token and an fp32 state; got {q.shape[1]} "
                         f"tokens and a {state.dtype} state")
    if kernels != "torch" and (q.is_cuda or (kernels == "triton" and triton_interpreted())):
        from .kernels.retention_triton import recurrent_step

        return recurrent_step(q[:, 0], k[:, 0], v[:, 0], log_gamma, state)[:, None]
    gamma = torch.exp(log_gamma.to(device=q.device, dtype=torch.float32))[None, :, None, None]
    state.mul_(gamma).add_(k[:, 0, :, :, None].float() * v[:, 0, :, None, :].float())
    return torch.einsum("bhk,bhkv->bhv", q[:, 0].float(), state).to(q.dtype)[:, None]


def windowed_step(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, state: WindowedState,
                  position: Tensor) -> Tensor:
    """recurrent_step_in_place for a state written back once per window (retention_state.py), in
    torch: q, k [B, 1, H, d_k], v [B, 1, H, d_v] of the tokens at position [B] -> o [B, 1, H, d_v].
    The window's last token writes the whole state back as the base; any other joins the window."""
    B = q.shape[0]
    c = state.counts(position)
    gamma = torch.exp(log_gamma.to(device=q.device, dtype=torch.float32))[None, :, None, None]
    S = state.materialize(position, log_gamma) * gamma + k[:, 0, :, :, None].float() * v[:, 0, :, None, :].float()
    last = (c == state.window - 1)[:, None, None, None]
    state.base.copy_(torch.where(last, S, state.base))
    rows = torch.arange(B, device=q.device)
    state.keys[rows, :, c] = k[:, 0].to(state.keys.dtype)  # [B, H, d_k] into slot c of each row
    state.values[rows, :, c] = v[:, 0].to(state.values.dtype)
    return torch.einsum("bhk,bhkv->bhv", q[:, 0].float(), S).to(q.dtype)[:, None]


def retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, mode: str,
              state: Tensor | WindowedState | None = None, need_state: bool = False, chunk_size: int = 64,
              kernels: str = "torch", in_place: bool = False, doc_starts: Tensor | None = None,
              cu_seqlens: Tensor | None = None, keep: str = "none", position: int | Tensor = 0):
    """Dispatch to one form. `kernels` is the model's resolved choice (model.kernels): with "fla" or
    "triton", chunkwise and recurrent run those kernels (they do the chunking themselves, so
    `chunk_size` only shapes the torch form); the parallel form and dtypes a kernel does not take
    (its `usable`, e.g. float64) run in torch. `in_place`: `state` is an fp32 buffer the call updates
    in place (the inference engine), one recurrent token or a chunkwise / parallel prefill; returns
    (o, that same state). doc_starts [B, T] bool: the state restarts at each document's first
    token (the kernels take them as variable-length sequences, `cu_seqlens` = packed_cu_seqlens(
    doc_starts), the incoming state entering each row's first one). keep: model.retention_keep, what
    the triton kernels keep from the forward for the backward (the other forms ignore it).
    An in-place state may be a WindowedState (written back once per window); position, the first
    token's position (int, or [B]), then says where each sequence is in its window. A prefill into
    one first folds its window into the base."""
    if in_place and doc_starts is not None:
        raise ValueError("doc_starts with a state updated in place (the inference engine) is not supported")
    if in_place and isinstance(state, WindowedState):
        if mode == "recurrent":
            return windowed_step(q, k, v, log_gamma, state, position), state
        state.base.copy_(state.materialize(position, log_gamma))  # exact (a no-op) for an empty window
        o, _ = retention(q, k, v, log_gamma, mode, state.base, need_state, chunk_size, kernels, in_place=True)
        state.restart_at(position + q.shape[1])
        return o, state
    if in_place and mode == "recurrent":
        return recurrent_step_in_place(q, k, v, log_gamma, state, kernels), state
    if in_place:  # a prefill: the buffer is the incoming state and receives the final one
        o, final = retention(q, k, v, log_gamma, mode, state, True, chunk_size, kernels)
        state.copy_(final)
        return o, state
    if kernels != "torch" and mode != "parallel" and doc_starts is not None:
        if _fast_module(kernels).usable(q):
            cu_seqlens = packed_cu_seqlens(doc_starts) if cu_seqlens is None else cu_seqlens
            return _documents_as_sequences(q, k, v, log_gamma, cu_seqlens, _fast_module(kernels), doc_starts,
                                           state, need_state, keep)
        kernels = "torch"
    if kernels != "torch" and mode != "parallel":
        fast = _fast_module(kernels)
        if not (q.is_cuda or (kernels == "triton" and triton_interpreted())):
            raise RuntimeError(f"model.kernels={kernels!r} was resolved when the model was built, but this call "
                               f"has {q.device.type} tensors; build the model where it runs (kernels=auto or torch)")
        if fast.usable(q):
            return fast.retention(q, k, v, log_gamma, mode, state, need_state, keep=keep)
    if mode == "parallel":
        return parallel_retention(q, k, v, log_gamma, state, need_state, doc_starts)
    if mode == "chunkwise":
        return chunkwise_retention(q, k, v, log_gamma, state, need_state, chunk_size, doc_starts)
    if mode == "recurrent":
        return recurrent_retention(q, k, v, log_gamma, state, need_state, doc_starts)
    raise ValueError(f"unknown retention mode {mode!r}; expected parallel, chunkwise or recurrent")


def packed_cu_seqlens(doc_starts: Tensor) -> Tensor:
    """doc_starts [B, T] -> int32 offsets [N + 1] of every document of every row in the packed row
    of B * T tokens (a row's first token always starts one). One host synchronisation: compute
    it once per forward."""
    B, T = doc_starts.shape
    starts = doc_starts.clone()
    starts[:, 0] = True
    first = starts.flatten().nonzero().flatten()
    return torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)


def _documents_as_sequences(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, cu_seqlens: Tensor, fast,
                            doc_starts: Tensor, state: Tensor | None = None, need_state: bool = False,
                            keep: str = "none"):
    """Every document as its own sequence of one packed row, through a kernel module's
    variable-length path: [B, T, H, D] -> (o [B, T, H, d_v], final state [B, H, d_k, d_v] or None).
    The incoming state [B, H, d_k, d_v] enters the first sequence of each row unless a document
    starts at its first token; each row's final state is its last sequence's."""
    B, T = q.shape[:2]
    flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v)]
    n_seq = cu_seqlens.numel() - 1
    per_row = doc_starts[:, 1:].sum(dim=1) + 1  # sequences of each row (its token 0 always starts one)
    last = per_row.cumsum(0) - 1  # [B]: index of each row's last sequence
    init = None
    if state is not None:
        first = last - per_row + 1
        continues = (~doc_starts[:, 0]).to(state.dtype)[:, None, None, None]
        init = state.new_zeros(n_seq, *state.shape[1:]).index_add(0, first, state * continues)
    o, finals = fast.retention(*flat, log_gamma, "chunkwise", init, need_state, cu_seqlens=cu_seqlens, keep=keep)
    return o.reshape(B, T, *o.shape[2:]), (finals[last] if need_state else None)


def _fast_module(kernels: str):
    if kernels == "fla":  # imported on first use: fla and triton load only where they run
        from .kernels import fla_retention as fast
    elif kernels == "triton":
        from .kernels import retention_triton as fast
    else:
        raise ValueError(f"model.kernels={kernels!r}: no such retention kernels")
    return fast
