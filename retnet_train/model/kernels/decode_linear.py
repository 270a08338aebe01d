"""Host side of the decoding step's few-row linear layers (decode_linear_kernel.py): a norm before,
GELU or a residual add after, and programmatic dependent launch with the weight's L2 prefetch
where the GPU has it (Hopper and later)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAX_ROWS = 16  # rows (decoding batch) one launch takes: the tensor-core tile's height


@dataclass(frozen=True)
class LinearTiles:
    block_n: int = 16  # output columns per program (N / block_n programs: 128 for a 2048-wide output)
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 2


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (griddepcontrol) needs compute capability 9.0 (Hopper) or later."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def few_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, norm: tuple | None = None,
                   gelu: bool = False, residual: Tensor | None = None, out: Tensor | None = None,
                   pdl: bool = False, prefetch_k: int = 0, tiles: LinearTiles = LinearTiles()) -> Tensor:
    """x [M, K] (M <= 16, unit column stride), weight [N, K] contiguous -> [M, N] in x's dtype:
    act(norm(x) @ weight.T + bias) + residual. norm: (kind "layernorm" | "rmsnorm", weight [K] or
    None, bias [K] or None, eps). residual [M, N] (may be `out`: updated in place). pdl: launch as a
    programmatic dependent kernel (pdl_supported); prefetch_k: ask the L2 for the first prefetch_k
    columns of this program's weight rows before waiting for the previous kernel (prefetch_share
    rounds a share of K to such a count)."""
    out, launch = launch_few_row_linear(x, weight, bias, norm=norm, gelu=gelu, residual=residual, out=out, pdl=pdl,
                                        prefetch_k=prefetch_k, tiles=tiles)
    launch()
    return out


def launch_few_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, norm: tuple | None = None,
                          gelu: bool = False, residual: Tensor | None = None, out: Tensor | None = None,
                          pdl: bool = False, prefetch_k: int = 0, tiles: LinearTiles = LinearTiles()):
    """(out, its retention_launch.Launch): few_row_linear's launch, which aot.py compiles."""
    from .decode_linear_kernel import ACT_GELU, ACT_NONE, NORM_LAYER, NORM_NONE, NORM_RMS, few_row_linear_kernel
    from .retention_launch import Launch

    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS or weight.shape[1] != K or not weight.is_contiguous() or x.stride(1) != 1:
        raise ValueError(f"few_row_linear takes x [M <= {MAX_ROWS}, K] with unit column stride and a contiguous "
                         f"weight [N, K]; got x {tuple(x.shape)} (strides {x.stride()}), weight {tuple(weight.shape)}")
    lines = prefetch_k // 64
    if prefetch_k % 64 or lines & (lines - 1) or prefetch_k > K:
        raise ValueError(f"prefetch_k={prefetch_k} must be 64 times a power of two (whole 128-byte lines of a "
                         f"16-bit weight row, a power-of-two count of them) and at most K={K}")
    out = x.new_empty(M, N) if out is None else out
    kind, nw, nb, eps = norm if norm is not None else (None, None, None, 0.0)
    args = dict(X=x, W=weight, Bias=bias, R=residual, Y=out, NW=nw, NB=nb, M=M, N=N, K=K, x_row=x.stride(0),
                r_row=residual.stride(0) if residual is not None else 0, y_row=out.stride(0), eps=eps)
    constexprs = dict(MP=1 if M == 1 else MAX_ROWS, BN=tiles.block_n, BK=tiles.block_k,
                      NORM={None: NORM_NONE, "layernorm": NORM_LAYER, "rmsnorm": NORM_RMS}[kind],
                      HAS_NW=nw is not None, HAS_NB=nb is not None, HAS_BIAS=bias is not None,
                      ACT=ACT_GELU if gelu else ACT_NONE, RESIDUAL=residual is not None, PDL=pdl,
                      PREFETCH_K=prefetch_k)
    return out, Launch(few_row_linear_kernel, (triton_cdiv(N, tiles.block_n),), args, constexprs,
                       num_warps=tiles.num_warps, num_stages=tiles.num_stages, launch_pdl=pdl)


def prefetch_share(k: int, share: float) -> int:
    """The largest prefetch_k (64 times a power of two) within share * k columns."""
    lines = int(k * share) // 64
    return 64 * (1 << (lines.bit_length() - 1)) if lines else 0


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
