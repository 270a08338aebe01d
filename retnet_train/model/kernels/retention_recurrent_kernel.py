"""Triton kernel of recurrent retention: token by token, the state in registers (decoding)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def recurrent_kernel(Q, K, V, O, STATE_IN, STATE_OUT, LOG2_GAMMA, T,
                     H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr,
                     BV: tl.constexpr, HAS_STATE: tl.constexpr, STORE_STATE: tl.constexpr):
    """S_t = gamma S_{t-1} + k_t^T v_t ; o_t = q_t S_t, for t = 0..T-1.

    Grid (cdiv(DV, BV), B * H): each program owns the state columns [DKP, BV] of one (batch, head)
    and keeps them in fp32 registers over all T tokens. q, k [B, T, H, DK], v, o [B, T, H, DV];
    states [B, H, DK, DV] fp32. STATE_OUT may be STATE_IN (an in-place update: each program reads
    its tile before it writes it, and no two programs share a tile).
    """
    vb, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    h = bh % H
    ks = tl.arange(0, DKP)
    vs = vb * BV + tl.arange(0, BV)
    k_ok = ks < DK
    v_ok = vs < DV
    tile = bh.to(tl.int64) * (DK * DV) + ks[:, None] * DV + vs[None, :]
    if HAS_STATE:
        state = tl.load(STATE_IN + tile, mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    else:
        state = tl.zeros([DKP, BV], dtype=tl.float32)
    gamma = tl.exp2(tl.load(LOG2_GAMMA + h))
    for t in range(T):
        row = (b.to(tl.int64) * T + t) * H + h
        q = tl.load(Q + row * DK + ks, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(K + row * DK + ks, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(V + row * DV + vs, mask=v_ok, other=0.0).to(tl.float32)
        state = state * gamma + k[:, None] * v[None, :]
        o = tl.sum(state * q[:, None], axis=0)
        tl.store(O + row * DV + vs, o.to(O.dtype.element_ty), mask=v_ok)
    if STORE_STATE:
        tl.store(STATE_OUT + tile, state, mask=k_ok[:, None] & v_ok[None, :])
