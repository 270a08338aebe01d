"""y = x W^T (+ b) for a few rows of x: the matmuls of a decoding step (1-16 sequences, one token each).

With so few rows a matmul is a pass over its weight: reading W is all the time it takes. cuBLAS's
kernels for these shapes reach 1.6-2.3 TB/s of an H100's 3.35 (bench/decode_profile.py); this
kernel is the "swapped" product W [BLOCK_N, K] @ x^T [K, 16] with deep pipelining of W's tiles
and each program owning whole output columns (no split-K reduction pass).

The op is a torch.library custom op, so a compiled decoding step calls it as one opaque kernel.
Inference only: it has no backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_ROWS = 16  # up to this many rows of x; more rows are a real matmul (cuBLAS)


@triton.jit
def skinny_matmul_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Program n: Y[:, n*BLOCK_N : (n+1)*BLOCK_N] = X [M, K] @ W[rows, :]^T, accumulated in fp32.

    W [N, K] row-major (a Linear's weight), X [M, K] with M <= BLOCK_M, Y [M, N].
    """
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    m_ok = rm < M
    w_ptr = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    x_ptr = X + rm[None, :] * stride_xm + rk[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptr, mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptr, mask=m_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + rk) < K
            w = tl.load(w_ptr, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(w, x.to(w.dtype))  # [BLOCK_N, K] @ [K, BLOCK_M]
        w_ptr += BLOCK_K
        x_ptr += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y_ptr = Y + rm[None, :] * stride_ym + rn[:, None]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def default_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) by the weight's shape: enough programs to keep every
    SM reading (N / BLOCK_N of them), each with several tiles of W in flight."""
    block_n = 16 if n <= 4096 else 32 if n <= 16384 else 64
    return block_n, 256, 4, 4


def launch_args(x2: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, config=None):
    """(grid, args, constexprs, warps, stages) of one launch: y [M, N] = x2 [M, K] @ weight^T."""
    M, K = x2.shape
    N = weight.shape[0]
    block_n, block_k, warps, stages = config or default_config(N, K)
    args = dict(X=x2, W=weight, BIAS=bias if bias is not None else weight, Y=y, M=M, N=N, K=K,
                stride_xm=x2.stride(0), stride_wn=weight.stride(0), stride_ym=y.stride(0))
    consts = dict(HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
                  EVEN_K=K % block_k == 0)
    return (math.ceil(N / block_n),), args, consts, warps, stages


def skinny_linear_raw(x2: Tensor, weight: Tensor, bias: Tensor | None, config=None) -> Tensor:
    """x2 [M, K] (M <= MAX_ROWS), weight [N, K] contiguous -> [M, N] in x2's dtype."""
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=x2.dtype, device=x2.device)
    grid, args, consts, warps, stages = launch_args(x2, weight, bias, y, config)
    skinny_matmul_kernel[grid](**args, **consts, num_warps=warps, num_stages=stages)
    return y


@torch.library.custom_op("retnet::skinny_linear", mutates_args=())
def _skinny_linear_op(x2: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return skinny_linear_raw(x2, weight, bias)


@_skinny_linear_op.register_fake
def _(x2, weight, bias):
    return x2.new_empty(x2.shape[0], weight.shape[0])


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether skinny_linear takes this call: few rows, 16-bit weights, no gradient wanted."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (rows <= MAX_ROWS and weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype
            and weight.is_contiguous() and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for x [..., K] of at most MAX_ROWS rows (check `usable` first)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _skinny_linear_op(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
