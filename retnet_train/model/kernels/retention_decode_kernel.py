"""Triton kernel of one decoding step of multi-scale retention, from the fused projection to the
gated head norm: what sits between the q/k/v/g matmul and the output projection, in one launch.

    q, k = rotary(q), rotary(k) / sqrt(d_k)
    S <- gamma S + k^T v              (the fp32 state, in place)
    o = q S
    y = silu(g) * HeadNorm(o)

Unfused, a compiled decoding step spends four to five small kernels per layer on this (rotary, the
copies that make v and g contiguous, the state update, the norm + gate), each a few microseconds
of launch gap and ramp for a few hundred KiB of work; 24 layers of them were a fifth of the step.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._norm_gate_triton import _swish_gated_norm


@triton.jit
def _rotate(X, at, ks, k_ok, sin, cos, sign):
    """Interleaved rotary of one head's row X[at + ks] [DKP] -> fp32, rounded through X's dtype as
    layers.apply_rotary rounds it (so the fused step equals the unfused one)."""
    x = tl.load(X + at + ks, mask=k_ok, other=0.0).to(tl.float32)
    partner = tl.load(X + at + (ks ^ 1), mask=k_ok, other=0.0).to(tl.float32)
    return (x * cos + sign * partner * sin).to(X.dtype.element_ty).to(tl.float32)


@triton.jit
def _windowed_step(STATE, KWIN, VWIN, POS, START, base, tile, in_tile, q, k, v, lg2, b, bh, vb, ks, k_ok, vs, v_ok,
                   DK: tl.constexpr, DV: tl.constexpr, WINDOW: tl.constexpr):
    """o [BV] of this program's columns from the base [DKP, BV] and the c tokens of the window
    (retention_state.py's formulas); the window's last token writes the state back, any other
    appends its key and value to the window. (Reading the window as two tiles in one load each, and
    the write-back from them, measured slower on an H100: 60.5 against 46.2 us per layer at batch 16
    with 8-token windows, bench/RESULTS.md 2026-12-06.)"""
    c = (tl.load(POS + b) - tl.load(START + b)) % WINDOW
    win = bh.to(tl.int64) * WINDOW
    if c == WINDOW - 1:
        # the window's last token: S_t in full, written back, and o = q S_t from it (one pass over
        # the window's keys and values, not one for o and another for the write-back)
        state = base * tl.exp2(WINDOW * lg2) + k[:, None] * v[None, :]
        for j in range(0, c):
            kj = tl.load(KWIN + (win + j) * DK + ks, mask=k_ok, other=0.0).to(tl.float32)
            vj = tl.load(VWIN + (win + j) * DV + vs, mask=v_ok, other=0.0).to(tl.float32)
            state += (tl.exp2((c - j).to(tl.float32) * lg2) * kj)[:, None] * vj[None, :]
        tl.store(STATE + tile, state, mask=in_tile)
        o = tl.sum(state * q[:, None], axis=0)
    else:
        o = tl.sum(base * q[:, None], axis=0) * tl.exp2((c + 1).to(tl.float32) * lg2) + tl.sum(q * k) * v
        for j in range(0, c):
            kj = tl.load(KWIN + (win + j) * DK + ks, mask=k_ok, other=0.0).to(tl.float32)
            vj = tl.load(VWIN + (win + j) * DV + vs, mask=v_ok, other=0.0).to(tl.float32)
            o += (tl.exp2((c - j).to(tl.float32) * lg2) * tl.sum(q * kj)) * vj
        if vb == 0:  # k is the same in every program of the head: the first writes it
            tl.store(KWIN + (win + c) * DK + ks, k.to(KWIN.dtype.element_ty), mask=k_ok)
        tl.store(VWIN + (win + c) * DV + vs, v.to(VWIN.dtype.element_ty), mask=v_ok)
    return o


@triton.jit
def decode_step_kernel(X, SIN, COS, STATE, KWIN, VWIN, POS, START, LOG2_GAMMA, W, Bias, OBUF, ARRIVALS, Y,
                       x_row, sin_row, key_scale, eps,
                       H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr,
                       DVP: tl.constexpr, BV: tl.constexpr, WINDOW: tl.constexpr,
                       GROUP: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Grid (cdiv(DV, BV), B * H). X [B, x_row]: each row is q, k [H * DK] then v, g [H * DV] of one
    sequence (the fused projection's output); SIN, COS [B or 1, DK] fp32 at the sequence's position
    (row stride sin_row, 0 for one position); STATE [B, H, DK, DV] fp32, updated in place; Y
    [B, H * DV]. OBUF [B * H, DV] (X's dtype) and ARRIVALS [>= B * H] int32 (zero before the
    first launch) are scratch.

    Program (vb, b * H + h) owns state columns [vb * BV, +BV) of head h, as the recurrent kernel.
    The head norm needs the whole row o[DV], so each program writes its slice of o to OBUF and
    counts itself in ARRIVALS[b * H + h]; the program that arrives last (the others' writes are
    visible to it: release / acquire on the counter) normalises and gates the row, and sets the
    counter back to zero for the next step.
    """
    vb, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    h = bh % H
    NB: tl.constexpr = (DV + BV - 1) // BV
    ks = tl.arange(0, DKP)
    k_ok = ks < DK
    row = b.to(tl.int64) * x_row
    sin = tl.load(SIN + b * sin_row + ks, mask=k_ok, other=0.0)
    cos = tl.load(COS + b * sin_row + ks, mask=k_ok, other=0.0)
    sign = tl.where(ks % 2 == 0, -1.0, 1.0)  # (x0, x1) -> (-x1, x0): the partner's sign
    q = _rotate(X, row + h * DK, ks, k_ok, sin, cos, sign)
    # the keys' 1/sqrt(d_k) rides on their rotation, as in MultiScaleRetention.forward
    k = _rotate(X, row + (H + h) * DK, ks, k_ok, sin * key_scale, cos * key_scale, sign)

    vs = vb * BV + tl.arange(0, BV)
    v_ok = vs < DV
    v = tl.load(X + row + 2 * H * DK + h * DV + vs, mask=v_ok, other=0.0).to(tl.float32)
    tile = bh.to(tl.int64) * (DK * DV) + ks[:, None] * DV + vs[None, :]
    in_tile = k_ok[:, None] & v_ok[None, :]
    state = tl.load(STATE + tile, mask=in_tile, other=0.0)
    lg2 = tl.load(LOG2_GAMMA + h)
    if WINDOW == 1:
        state = state * tl.exp2(lg2) + k[:, None] * v[None, :]
        tl.store(STATE + tile, state, mask=in_tile)
        o = tl.sum(state * q[:, None], axis=0)
    else:
        o = _windowed_step(STATE, KWIN, VWIN, POS, START, state, tile, in_tile, q, k, v, lg2, b, bh, vb, ks, k_ok,
                           vs, v_ok, DK, DV, WINDOW)
    tl.store(OBUF + bh.to(tl.int64) * DV + vs, o.to(OBUF.dtype.element_ty), mask=v_ok)

    tl.debug_barrier()  # every thread's slice of o is written before the counter says so
    arrived = tl.atomic_add(ARRIVALS + bh, 1, sem="acq_rel")
    if arrived % NB == NB - 1:
        cols = tl.arange(0, DVP)
        c_ok = cols < DV
        # .cg: read o from L2, where the other programs' writes are, never from a stale L1 line
        x = tl.load(OBUF + bh.to(tl.int64) * DV + cols, mask=c_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        gv = tl.load(X + row + 2 * H * DK + (H + h) * DV + cols, mask=c_ok, other=0.0).to(tl.float32)
        y, _, _ = _swish_gated_norm(x, gv, W, Bias, h * DV + cols, c_ok, DV, eps, GROUP, HAS_W, HAS_B)
        tl.store(Y + b.to(tl.int64) * (H * DV) + h * DV + cols, y.to(Y.dtype.element_ty), mask=c_ok)
        tl.atomic_xchg(ARRIVALS + bh, 0)
