"""Host side of the chunkwise retention kernels: segment layout, tile choices, and the launch
sequences of the forward and backward passes (see retention_chunk_kernels.py for the math).

Every launch is built as a `Launch` and handed to an executor (`run`, default: launch it), so the
AOT compiler (aot.py) replays exactly the launches of a real call, on meta tensors, and compiles
them instead of running them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .retention_chunk_kernels import (chunk_outputs_kernel, intra_scores_kernel, segment_scan_kernel,
                                      segment_sums_kernel)
from .retention_recurrent_kernel import recurrent_kernel

# Largest per-call head dims: the chunk_outputs program keeps a [Dx, BZ] fp32 state tile in
# registers and [C, Dx] operand tiles in shared memory. Wider heads are split by the caller.
MAX_DK = 256
MAX_DV = 512


@dataclass(frozen=True)
class Tuning:
    """Knobs of the chunkwise kernels; None picks a default from the shapes (and the GPU's size)."""

    chunk: int = 64  # C: tokens per chunk, a power of two >= 16
    segment_chunks: int | None = None  # segment length S in chunks
    block_z: int | None = None  # BZ of chunk_outputs (the output columns a program owns)
    num_warps: int | None = None  # of chunk_outputs
    num_stages: int = 1  # of chunk_outputs (pipelining depth; 1 measured 15-20% faster than 2 on an H200)
    sums_stages: int = 1  # of segment_sums (1 measured faster than 2 on an H200)
    # most elements of chunk_outputs' fp32 state tile [Dx, BZ] (it also passes through shared
    # memory: 4 bytes each): 32768 on NVIDIA (227 KiB of shared memory), 16384 on MI200 (64 KiB)
    state_tile: int = 32768

    def __post_init__(self):
        if self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk size {self.chunk} must be a power of two >= 16")
        if self.block_z is not None and (self.block_z < 16 or self.block_z & (self.block_z - 1)):
            raise ValueError(f"block_z {self.block_z} must be a power of two >= 16")
        if self.segment_chunks is not None and self.segment_chunks < 1:
            raise ValueError(f"segment_chunks {self.segment_chunks} must be >= 1")


@dataclass
class Launch:
    kernel: Callable  # a triton.JITFunction
    grid: tuple[int, ...]
    args: dict  # runtime arguments by name: tensors and ints
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def execute(launch: Launch) -> None:
    launch()


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(n - 1, 0).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # planning for an H100 (meta tensors in AOT; the interpreter does not care)


@dataclass
class Layout:
    """How the tokens are cut: N sequences (B rows of T tokens, or cu_seqlens), segments of S tokens.

    n_seg is the segment grid size: exact for fixed-length rows, an upper bound (T_total // S + N)
    for varlen, whose padding entries map to sequence N and do nothing.
    """

    T: int  # tokens per row (fixed length) or T_total (varlen)
    N: int
    S: int
    C: int
    n_seg: int
    varlen: bool
    cu_seqlens: Tensor  # int32 [N + 1] (a 1-element dummy when not varlen)
    seg_seq: Tensor  # int32 [n_seg]: the sequence of each segment
    seg_first: Tensor  # int32 [N + 1]: first segment of each sequence

    def index_args(self) -> dict:
        return dict(cu_seqlens=self.cu_seqlens, seg_seq=self.seg_seq, seg_first=self.seg_first, T=self.T, N=self.N, S=self.S,
                    VARLEN=int(self.varlen))


def segment_length(tokens: int, longest: int, H: int, DV: int, tuning: Tuning, device: torch.device) -> int:
    """S: long enough that few fp32 segment states are written, short enough that the
    chunk_outputs grid (segments x H x column blocks) gives every SM about 4 programs."""
    C = tuning.chunk
    if tuning.segment_chunks is not None:
        return C * tuning.segment_chunks
    col_blocks = math.ceil(DV / 128)
    want_segments = math.ceil(4 * _sm_count(device) / (H * col_blocks))
    S = C
    while S < 4096 and S < longest and tokens // (2 * S) >= want_segments:
        S *= 2
    return S


def make_layout(B: int, T: int, H: int, DV: int, cu_seqlens: Tensor | None, tuning: Tuning,
                device: torch.device) -> Layout:
    C = tuning.chunk
    if cu_seqlens is None:
        S = segment_length(B * T, T, H, DV, tuning, device)
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return Layout(T, B, S, C, B * math.ceil(T / S), False, dummy, dummy, dummy)
    N = cu_seqlens.numel() - 1
    S = segment_length(T, T, H, DV, tuning, device)
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    # built with device ops only (no host sync): segments per sequence, their prefix sums, and for
    # each grid entry g its sequence (searchsorted; N for entries past the last segment)
    n_per_seq = torch.div(cu[1:] - cu[:-1] + (S - 1), S, rounding_mode="floor")
    seg_first = torch.zeros(N + 1, dtype=torch.int32, device=device)
    seg_first[1:] = torch.cumsum(n_per_seq, 0)
    n_seg = T // S + N
    g = torch.arange(n_seg, dtype=torch.int32, device=device)
    seg_seq = torch.searchsorted(seg_first[1:].contiguous(), g, right=True).to(torch.int32)
    return Layout(T, N, S, C, n_seg, True, cu, seg_seq, seg_first)


# ---- one launch per kernel role ------------------------------------------------------------------

def intra_scores(x: Tensor, y: Tensor, lg2: Tensor, lay: Layout) -> tuple[Tensor, Launch]:
    """M [T_total, H, C]: decayed causal in-chunk scores x_i . y_j."""
    T_total, H, D = x.shape
    m = torch.empty(T_total, H, lay.C, dtype=x.dtype, device=x.device)
    BD = min(64, pow2(D))
    grid = (math.ceil(lay.S / lay.C), lay.n_seg, H)
    return m, Launch(intra_scores_kernel, grid, dict(X=x, Y=y, M=m, LOG2_GAMMA=lg2, **lay.index_args()),
                     dict(H=H, D=D, C=lay.C, BD=BD),
                     num_warps=4, num_stages=2)


def segment_sums(y: Tensor, z: Tensor, lg2: Tensor, lay: Layout, reverse: bool, tuning: Tuning) -> tuple[Tensor, Launch]:
    """[n_seg, H, Dy, Dz] fp32: each segment's decayed sum of y^T z."""
    T_total, H, DY = y.shape
    DZ = z.shape[-1]
    out = torch.empty(lay.n_seg, H, DY, DZ, dtype=torch.float32, device=y.device)
    BY, BZ = min(128, pow2(DY)), min(128, pow2(DZ))
    grid = (math.ceil(DY / BY) * math.ceil(DZ / BZ), lay.n_seg, H)
    return out, Launch(segment_sums_kernel, grid, dict(Y=y, Z=z, OUT=out, LOG2_GAMMA=lg2, **lay.index_args()),
                       dict(H=H, DY=DY, DZ=DZ, BT=min(64, lay.C), BY=BY, BZ=BZ, REVERSE=reverse),
                       num_warps=8 if BY * BZ >= 128 * 128 else 4, num_stages=tuning.sums_stages)


def segment_scan(buf: Tensor, lg2: Tensor, init: Tensor | None, store_final: bool, lay: Layout,
                 reverse: bool) -> tuple[Tensor | None, Launch]:
    """In place: segment sums -> boundary states; returns the final running state [N, H, Dy, Dz]."""
    _, H, DY, DZ = buf.shape
    E = DY * DZ
    final = torch.empty(lay.N, H, DY, DZ, dtype=torch.float32, device=buf.device) if store_final else None
    BLOCK = 2048
    args = dict(BUF=buf, LOG2_GAMMA=lg2, INIT=buf if init is None else init, FINAL=buf if final is None else final,
                cu_seqlens=lay.cu_seqlens, seg_first=lay.seg_first, T=lay.T, S=lay.S, VARLEN=int(lay.varlen))
    return final, Launch(segment_scan_kernel, (math.ceil(E / BLOCK), lay.N * H), args,
                         dict(H=H, E=E, BLOCK=BLOCK, REVERSE=reverse,
                              HAS_INIT=init is not None, STORE_FINAL=store_final), num_warps=8, num_stages=1)


def chunk_outputs(x: Tensor, y: Tensor, z: Tensor, m: Tensor, state: Tensor, transposed_state: bool,
                  lg2: Tensor, lay: Layout, reverse: bool, tuning: Tuning) -> tuple[Tensor, Launch]:
    """out [T_total, H, Dz] = chunk by chunk, decay * x @ state + m @ z (see the kernel)."""
    T_total, H, DX = x.shape
    DZ = z.shape[-1]
    DXP = pow2(DX)
    BZ = tuning.block_z or max(16, min(128, pow2(DZ), tuning.state_tile // DXP))
    warps = tuning.num_warps or (8 if DXP * BZ >= 128 * 128 else 4)
    # the state buffer is [n_seg, H, Dk, Dv]; as [Dx, Dz] it is read directly or transposed
    sx, sz = (1, DX) if transposed_state else (DZ, 1)
    out = torch.empty(T_total, H, DZ, dtype=z.dtype, device=z.device)
    args = dict(X=x, Y=y, Z=z, M=m, STATE=state, OUT=out, LOG2_GAMMA=lg2, **lay.index_args(),
                STATE_SX=sx, STATE_SZ=sz)
    return out, Launch(chunk_outputs_kernel, (math.ceil(DZ / BZ), lay.n_seg, H), args,
                       dict(H=H, DX=DX, DZ=DZ, DXP=DXP, C=lay.C, BZ=BZ, REVERSE=reverse),
                       num_warps=warps, num_stages=tuning.num_stages)


def recurrent(q: Tensor, k: Tensor, v: Tensor, lg2: Tensor, state_in: Tensor | None,
              state_out: Tensor | None) -> tuple[Tensor, Launch]:
    """o [B, T, H, DV] token by token; state_out (may be state_in: in place) gets the final state."""
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    DKP = pow2(DK)
    BV = max(16, min(pow2(DV), 8192 // DKP))
    o = torch.empty_like(v)
    args = dict(Q=q, K=k, V=v, O=o, STATE_IN=state_in if state_in is not None else lg2,
                STATE_OUT=state_out if state_out is not None else lg2, LOG2_GAMMA=lg2, T=T)
    return o, Launch(recurrent_kernel, (math.ceil(DV / BV), B * H), args,
                     dict(H=H, DK=DK, DV=DV, DKP=DKP, BV=BV, HAS_STATE=state_in is not None,
                          STORE_STATE=state_out is not None), num_warps=4, num_stages=1)


# ---- the passes ----------------------------------------------------------------------------------

def boundary_states(k: Tensor, v: Tensor, lg2: Tensor, state0: Tensor | None, need_final: bool, lay: Layout,
                    tuning: Tuning, run: Callable[[Launch], None]) -> tuple[Tensor, Tensor | None]:
    """States entering each segment [n_seg, H, DK, DV] fp32, and the final state per sequence."""
    states, launch = segment_sums(k, v, lg2, lay, reverse=False, tuning=tuning)
    run(launch)
    final, launch = segment_scan(states, lg2, state0, need_final, lay, reverse=False)
    run(launch)
    return states, final


def forward(q: Tensor, k: Tensor, v: Tensor, lg2: Tensor, state0: Tensor | None, need_final: bool,
            lay: Layout, tuning: Tuning, run: Callable[[Launch], None] = execute):
    """q, k [T_total, H, DK], v [T_total, H, DV] -> (o, final state or None, A for the backward)."""
    A, launch = intra_scores(q, k, lg2, lay)
    run(launch)
    states, final = boundary_states(k, v, lg2, state0, need_final, lay, tuning, run)
    o, launch = chunk_outputs(q, k, v, A, states, False, lg2, lay, reverse=False, tuning=tuning)
    run(launch)
    return o, final, A


def backward(q: Tensor, k: Tensor, v: Tensor, A: Tensor, lg2: Tensor, state0: Tensor | None, do: Tensor,
             dfinal: Tensor | None, need_dstate0: bool, lay: Layout, tuning: Tuning,
             run: Callable[[Launch], None] = execute):
    """-> dq, dk, dv (input dtype), d(initial state) [N, H, DK, DV] fp32 or None.

    The segment states are recomputed (one GEMM-like pass over k, v) rather than kept from the
    forward: kept, they would cost DK*DV*4 bytes per segment and head for every layer, a lot for
    packed short documents (each is at least one segment).
    """
    states, _ = boundary_states(k, v, lg2, state0, False, lay, tuning, run)
    # the gradient of the state leaving each segment: a reverse scan of the decayed q^T do sums
    grads, launch = segment_sums(q, do, lg2, lay, reverse=True, tuning=tuning)
    run(launch)
    dstate0, launch = segment_scan(grads, lg2, dfinal, need_dstate0, lay, reverse=True)
    run(launch)
    dA, launch = intra_scores(do, v, lg2, lay)
    run(launch)
    dq, launch = chunk_outputs(do, v, k, dA, states, True, lg2, lay, reverse=False, tuning=tuning)
    run(launch)
    dk, launch = chunk_outputs(v, do, q, dA, grads, True, lg2, lay, reverse=True, tuning=tuning)
    run(launch)
    dv, launch = chunk_outputs(k, q, do, A, grads, False, lg2, lay, reverse=True, tuning=tuning)
    run(launch)
    return dq, dk, dv, dstate0


def default_tuning(chunk: int = 64, rocm: bool = False) -> Tuning:
    # MI200: 64 KiB of shared memory, so half the state tile and no multi-buffered operand loads
    return Tuning(chunk=chunk, state_tile=16384, num_stages=1) if rocm else Tuning(chunk=chunk)


def with_tuning(tuning: Tuning | None, chunk: int) -> Tuning:
    if tuning is None:
        return default_tuning(chunk, rocm=torch.version.hip is not None)
    return dataclasses.replace(tuning, chunk=chunk)
