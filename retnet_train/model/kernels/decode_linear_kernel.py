"""Triton kernel of a decoding step's few-row linear layer, with what sits around it fused in:

    y = act(norm(x) W^T + b) (+ r)        x [M, K] with M <= 16 rows (the decoding batch)

At decoding batch sizes a linear layer is a stream of its weight through the chip (16.8 MB at
retnet_1.3b's out_proj, fc1 and fc2): the arithmetic is nothing, and the time is the DRAM's plus
each kernel's ramp-up and drain, which on an H100 cost as much as the stream itself (10.4 us per
16.8 MB weight under cuBLAS where 5.0 us would read it). This kernel hides that gap with
programmatic dependent launch (Hopper's griddepcontrol): it starts while the kernel before it
still runs, asks the L2 for its own weight rows (which depend on nothing earlier), and only then
waits for the previous kernel's output; once past the wait it lets the next kernel start the same
way. The norm before the layer (so it needs no kernel of its own, which would break that chain) and
the activation or residual add after it are done here, rounding as the unfused torch layers round.
"""

from __future__ import annotations

import triton
import triton.language as tl

NORM_NONE, NORM_LAYER, NORM_RMS = 0, 1, 2
ACT_NONE, ACT_GELU = 0, 1


@triton.jit
def _prefetch_to_l2(ptrs):
    """Ask the L2 for the 128-byte lines at ptrs, kept with priority (evict_last): no registers are
    filled and nothing waits for them; a later load finds them there."""
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _row_stats(X, ms, m_ok, x_row, K, eps, BK: tl.constexpr, MP: tl.constexpr, NORM: tl.constexpr):
    """mean [MP] (0 for RMSNorm) and 1/sqrt(var + eps) of the M rows of X [M, K] in fp32, in two
    passes as torch computes them (the rows are a few KiB each, read from L2)."""
    mean = tl.zeros([MP], dtype=tl.float32)
    if NORM == 1:
        total = tl.zeros([MP], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(X + ms[:, None] * x_row + ks[None, :], mask=m_ok[:, None] & (ks < K)[None, :],
                        other=0.0).to(tl.float32)
            total += tl.sum(x, axis=1)
        mean = total / K
    squares = tl.zeros([MP], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        ok = m_ok[:, None] & (ks < K)[None, :]
        x = tl.load(X + ms[:, None] * x_row + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.where(ok, x - mean[:, None], 0.0)
        squares += tl.sum(x * x, axis=1)
    return mean, 1.0 / tl.sqrt(squares / K + eps)


@triton.jit
def few_row_linear_kernel(X, W, Bias, R, Y, NW, NB, M, N, K, x_row, r_row, y_row, eps,
                          MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
                          HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, HAS_BIAS: tl.constexpr,
                          ACT: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                          PREFETCH_K: tl.constexpr):
    """Grid (cdiv(N, BN),). X [M, K] (row stride x_row), W [N, K] contiguous, Bias [N], R and Y
    [M, N] (row strides r_row, y_row; Y may be R: each program reads only the columns it writes),
    NW, NB [K]: the norm's weight and bias. MP: M rounded up (1, or a power of two >= 16 for the
    tensor cores). PREFETCH_K: how many of each weight row's first columns to ask the L2 for before
    the wait (0: none; a multiple of 64); PDL: the launch is a programmatic dependent one."""
    pid = tl.program_id(0)
    ns = pid * BN + tl.arange(0, BN)
    n_ok = ns < N
    w_rows = W + tl.minimum(ns, N - 1).to(tl.int64)[:, None] * K  # [BN, 1]: clamped, always a real row
    if PREFETCH_K > 0:
        lines = tl.arange(0, PREFETCH_K // 64) * 64  # one address per 128-byte line of bf16 / fp16
        _prefetch_to_l2(w_rows + lines[None, :])
    if PDL:
        tl.extra.cuda.gdc_wait()  # the previous kernel's writes (x, r) are visible from here on
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start prefetching its weights
    ms = tl.arange(0, MP)
    m_ok = ms < M
    if NORM != 0:
        mean, rstd = _row_stats(X, ms, m_ok, x_row, K, eps, BK, MP, NORM)
    acc = tl.zeros([MP, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        x = tl.load(X + ms[:, None] * x_row + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM != 0:
            xf = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if NORM == 2:  # layers.RMSNorm rounds x / rms(x) to x's dtype before the weight
                xf = xf.to(X.dtype.element_ty).to(tl.float32)
            if HAS_NW:
                xf = xf * tl.load(NW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_NB:
                xf = xf + tl.load(NB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            x = xf.to(Y.dtype.element_ty)  # the norm's output dtype, as torch's norm returns it
        w = tl.load(w_rows + ks[None, :], mask=k_ok[None, :], other=0.0)  # [BN, BK]
        if MP == 1:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
        else:
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(Bias + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(Y.dtype.element_ty)  # the linear's output, rounded as F.linear rounds it
    out_ok = m_ok[:, None] & n_ok[None, :]
    if ACT == 1:  # exact GELU in fp32 of the rounded output, as layers._hidden does
        yf = y.to(tl.float32)
        y = (0.5 * yf * (1.0 + tl.erf(yf * 0.7071067811865476))).to(Y.dtype.element_ty)
    if RESIDUAL:
        r = tl.load(R + ms[:, None] * r_row + ns[None, :], mask=out_ok, other=0.0)
        y = (r.to(tl.float32) + y.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + ms[:, None] * y_row + ns[None, :], y, mask=out_ok)
