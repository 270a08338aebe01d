"""Triton kernels of norm_gate.py (imported only where they run: a GPU, or TRITON_INTERPRET=1 tests).

Layout: o and g contiguous [rows, D] with rows = B * T * H in (token, head) order, so row r belongs
to head r % H and the affine weight of that head is weight[h * D : (h + 1) * D].
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from .retention_launch import Launch, execute


@triton.jit
def _swish_gated_norm(x, gv, W, Bias, w_at, mask, D, eps,
                     GROUP: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """One head's row: x, gv [BLOCK_D] fp32 (o and g; lanes outside `mask` are ignored), the head's
    affine weight and bias at W + w_at, Bias + w_at -> (silu(g) * norm(x) [BLOCK_D] fp32, mean, 1/std).
    The forward kernel below and the decoding step (retention_decode_kernel.py) share it."""
    mean = 0.0
    if GROUP:
        mean = tl.sum(tl.where(mask, x, 0.0), axis=0) / D
    x = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    n = x * rstd
    if HAS_W:
        n = n * tl.load(W + w_at, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        n = n + tl.load(Bias + w_at, mask=mask, other=0.0).to(tl.float32)
    return gv * tl.sigmoid(gv) * n, mean, rstd


@triton.jit
def norm_gate_forward_kernel(O, G, W, Bias, Y, Mean, Rstd, H, D, eps,
                             BLOCK_D: tl.constexpr, GROUP: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h = row % H
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(O + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    gv = tl.load(G + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = _swish_gated_norm(x, gv, W, Bias, h * D + cols, mask, D, eps, GROUP, HAS_W, HAS_B)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def norm_gate_backward_kernel(DY, O, G, W, Bias, Mean, Rstd, DO, DG, DW, DB, N_TOKENS, H, D, TOKENS_PER_PROG,
                              BLOCK_D: tl.constexpr, GROUP: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Program (p, h): tokens [p * TOKENS_PER_PROG, ...) of head h. It recomputes the normalised
    values from o, mean and 1/std, writes do and dg, and sums its rows' dweight / dbias into row p of
    DW / DB [programs, H * D] (summed over p afterwards)."""
    p = tl.program_id(0)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.full((BLOCK_D,), 1.0, tl.float32)
    b = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_W:
        w = tl.load(W + h * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(Bias + h * D + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), tl.float32)
    db_acc = tl.zeros((BLOCK_D,), tl.float32)
    start = p * TOKENS_PER_PROG
    for i in range(0, TOKENS_PER_PROG):
        token = start + i
        if token < N_TOKENS:
            row = token.to(tl.int64) * H + h
            x = tl.load(O + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            if GROUP:
                x = x - tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(mask, x * rstd, 0.0)
            gv = tl.load(G + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gv)
            n = xhat * w + b
            # d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g)))
            dg = dy * n * sig * (1.0 + gv * (1.0 - sig))
            dn = dy * gv * sig
            dw_acc += dn * xhat
            db_acc += dn
            dxhat = dn * w
            c2 = tl.sum(dxhat * xhat, axis=0) / D
            if GROUP:
                c1 = tl.sum(dxhat, axis=0) / D
                dx = (dxhat - c1 - xhat * c2) * rstd
            else:
                dx = (dxhat - xhat * c2) * rstd
            tl.store(DO + row * D + cols, dx.to(DO.dtype.element_ty), mask=mask)
            tl.store(DG + row * D + cols, dg.to(DG.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW + p * H * D + h * D + cols, dw_acc, mask=mask)
    if HAS_B:
        tl.store(DB + p * H * D + h * D + cols, db_acc, mask=mask)


def _warps(block_d: int) -> int:
    return min(max(block_d // 256, 1), 8)


def forward(o: Tensor, g: Tensor, weight: Tensor | None, bias: Tensor | None, group: bool, eps: float,
            run: Callable[[Launch], None] = execute):
    """-> y = silu(g) * norm(o), and the per-row mean and 1/std [B * T * H] fp32 for the backward.
    `run` executes the launch (aot.py passes a recorder instead)."""
    B, T, H, D = o.shape
    rows = B * T * H
    y = torch.empty(o.shape, dtype=torch.promote_types(o.dtype, g.dtype), device=o.device)
    mean = torch.empty(rows, dtype=torch.float32, device=o.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=o.device)
    block = triton.next_power_of_2(D)
    run(Launch(norm_gate_forward_kernel, (rows,),
               dict(O=o, G=g, W=weight, Bias=bias, Y=y, Mean=mean, Rstd=rstd, H=H, D=D, eps=eps),
               dict(BLOCK_D=block, GROUP=group, HAS_W=weight is not None, HAS_B=bias is not None),
               num_warps=_warps(block), num_stages=None))
    return y, mean, rstd


def backward(dy: Tensor, o: Tensor, g: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
             rstd: Tensor, group: bool, run: Callable[[Launch], None] = execute):
    B, T, H, D = o.shape
    tokens = B * T
    # enough programs to fill a GPU (~4 per SM x H), few enough that the [programs, H * D] fp32
    # partial sums of dweight stay small
    per_prog = max(1, triton.cdiv(tokens, 512))
    progs = triton.cdiv(tokens, per_prog)
    do = torch.empty_like(o)
    dg = torch.empty_like(g)
    dw = torch.empty(progs, H * D, dtype=torch.float32, device=o.device) if weight is not None else None
    db = torch.empty(progs, H * D, dtype=torch.float32, device=o.device) if bias is not None else None
    block = triton.next_power_of_2(D)
    run(Launch(norm_gate_backward_kernel, (progs, H),
               dict(DY=dy, O=o, G=g, W=weight, Bias=bias, Mean=mean, Rstd=rstd, DO=do, DG=dg, DW=dw, DB=db,
                    N_TOKENS=tokens, H=H, D=D, TOKENS_PER_PROG=per_prog),
               dict(BLOCK_D=block, GROUP=group, HAS_W=weight is not None, HAS_B=bias is not None),
               num_warps=_warps(block), num_stages=None))
    dweight = dw.sum(0).to(weight.dtype) if weight is not None else o.new_empty(0)
    dbias = db.sum(0).to(bias.dtype) if bias is not None else o.new_empty(0)
    return do, dg, dweight, dbias
