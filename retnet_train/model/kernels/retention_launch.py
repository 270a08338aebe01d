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

from .retention_chunk_kernels import intra_scores_kernel, segment_outputs_kernel, segment_states_kernel
from .retention_recurrent_kernel import recurrent_kernel

# Largest per-call head dims (the recurrent kernel keeps a [d_k, BV] state tile in registers, and
# the tiles below were chosen for these). Wider heads are split by the caller.
MAX_DK = 256
MAX_DV = 512


@dataclass(frozen=True)
class Tuning:
    """Knobs of the chunkwise kernels; None picks a default from the shapes (and the GPU's size)."""

    chunk: int = 64  # BM: rows (and columns) of a score tile and rows of an output tile; a power of two >= 16
    segment_chunks: int | None = None  # segment length S in chunks (None: 256 tokens, at least one chunk)
    block_z: int | None = None  # BZ of segment_outputs (the output columns a program owns)
    block_k: int = 64  # BK of segment_outputs (the state-contraction step)
    num_warps: int | None = None  # of segment_outputs
    num_stages: int = 3  # of segment_outputs (software-pipelining depth of its two loops)
    # segment_states' tile of the state [BY, BZ] (None: 64 x 128, or 64 x 64 where that leaves SMs
    # without about two programs) and its pipelining depth
    state_block: tuple[int, int] | None = None
    states_stages: int = 2
    states_bt: int = 64  # tokens per step of segment_states (its GEMMs' contraction); a power of two >= 16
    score_block: int | None = None  # intra_scores' [BS, BS] tile (None: the chunk); divides the segment
    # keep the forward's segment states for the backward instead of recomputing them: one
    # segment_states pass less per backward for 2 * DK * DV / S bytes per token and head (1 KiB at
    # S = 256, d_k 256, d_v 512) held from each layer's forward to its backward
    keep_states: bool = False
    # likewise the forward's in-segment scores: one intra_scores pass less for 2 * S bytes per token
    # and head (512 B at S = 256)
    keep_scores: bool = False

    def __post_init__(self):
        for name in ("chunk", "block_k", "states_bt", "block_z", "score_block"):
            n = getattr(self, name)
            if n is not None and (n < 16 or n & (n - 1)):
                raise ValueError(f"{'chunk size' if name == 'chunk' else name} {n} must be a power of two >= 16")
        # the segment's score tiles are a power-of-two arange in the kernels
        n = self.segment_chunks
        if n is not None and (n < 1 or n & (n - 1)):
            raise ValueError(f"segment_chunks {n} must be a power of two >= 1")
        if self.state_block is not None and any(b < 16 or b & (b - 1) for b in self.state_block):
            raise ValueError(f"state_block {self.state_block} must be two powers of two >= 16")


@dataclass
class Launch:
    kernel: Callable  # a triton.JITFunction
    grid: tuple[int, ...]
    args: dict  # runtime arguments by name: tensors and ints
    constexprs: dict
    num_warps: int = 4
    num_stages: int | None = 2  # None: the backend's default

    def __call__(self) -> None:
        stages = {} if self.num_stages is None else {"num_stages": self.num_stages}
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, **stages)


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


def segment_length(longest: int, tuning: Tuning) -> int:
    """S: 256 tokens by default (few states to write and read; the in-segment work grows with S),
    never longer than the longest sequence needs."""
    C = tuning.chunk
    S = C * (tuning.segment_chunks or max(1, 256 // C))
    if tuning.segment_chunks is None:
        S = min(S, max(C, pow2(longest, C)))
    return S


def make_layout(B: int, T: int, cu_seqlens: Tensor | None, tuning: Tuning, device: torch.device) -> Layout:
    C = tuning.chunk
    if cu_seqlens is None:
        S = segment_length(T, tuning)
        dummy = torch.empty(1, dtype=torch.int32, device=device)  # never read with VARLEN=0: no fill kernel
        return Layout(T, B, S, C, B * math.ceil(T / S), False, dummy, dummy, dummy)
    N = cu_seqlens.numel() - 1
    S = segment_length(T, tuning)
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

def intra_scores(x: Tensor, y: Tensor, lg2: Tensor, lay: Layout, tuning: Tuning) -> tuple[Tensor, Launch]:
    """M [T_total, H, S]: each segment's decayed causal scores x_i . y_j (lower triangle of tiles)."""
    T_total, H, D = x.shape
    m = torch.empty(T_total, H, lay.S, dtype=x.dtype, device=x.device)
    bs = min(tuning.score_block or lay.C, lay.S)
    bs = bs if lay.S % bs == 0 else lay.C
    nb = lay.S // bs
    return m, Launch(intra_scores_kernel, (nb * nb, lay.n_seg, H),
                     dict(X=x, Y=y, M=m, LOG2_GAMMA=lg2, **lay.index_args()),
                     dict(H=H, D=D, BM=bs, BD=min(64, pow2(D)), N_BLOCKS=nb), num_warps=8 if bs >= 128 else 4,
                     num_stages=2)


def state_block(DY: int, DZ: int, N: int, H: int, tuning: Tuning, device: torch.device) -> tuple[int, int]:
    """segment_states' tile: 64 x 128 unless that leaves SMs without about two programs (each
    program walks a whole sequence, so a few long sequences need smaller tiles to fill the GPU).
    128 x 128 and 128 x 256 measured slower on an H200 (bench/RESULTS.md, 2026-12-04 sweep)."""
    if tuning.state_block is not None:
        return tuning.state_block
    want = 2 * _sm_count(device)
    options = [(min(64, pow2(DY)), min(128, pow2(DZ))), (min(64, pow2(DY)), min(64, pow2(DZ)))]
    for by, bz in options:
        if N * H * math.ceil(DY / by) * math.ceil(DZ / bz) >= want:
            return by, bz
    return options[-1]


def segment_states(y: Tensor, z: Tensor, lg2: Tensor, init: Tensor | None, store_final: bool, lay: Layout,
                   reverse: bool, tuning: Tuning) -> tuple[Tensor, Tensor | None, Launch]:
    """STATES [n_seg, H, Dy, Dz] (input dtype) and the final running state [N, H, Dy, Dz] fp32 or None."""
    T_total, H, DY = y.shape
    DZ = z.shape[-1]
    states = torch.empty(lay.n_seg, H, DY, DZ, dtype=y.dtype, device=y.device)
    final = torch.empty(lay.N, H, DY, DZ, dtype=torch.float32, device=y.device) if store_final else None
    BY, BZ = state_block(DY, DZ, lay.N, H, tuning, y.device)
    bt = min(tuning.states_bt, lay.S)
    args = dict(Y=y, Z=z, STATES=states, INIT=states if init is None else init,
                FINAL=states if final is None else final, LOG2_GAMMA=lg2, cu_seqlens=lay.cu_seqlens,
                seg_first=lay.seg_first, T=lay.T, S=lay.S, VARLEN=int(lay.varlen))
    grid = (math.ceil(DY / BY) * math.ceil(DZ / BZ), lay.N, H)
    return states, final, Launch(segment_states_kernel, grid, args,
                                 dict(H=H, DY=DY, DZ=DZ, BY=BY, BZ=BZ, BT=bt, SB=lay.S // bt, REVERSE=reverse,
                                      HAS_INIT=init is not None, STORE_FINAL=store_final),
                                 num_warps=8 if BY * BZ >= 128 * 128 else 4, num_stages=tuning.states_stages)


def segment_outputs(x: Tensor, z: Tensor, m: Tensor, states: Tensor, transposed_state: bool, lg2: Tensor,
                    lay: Layout, reverse: bool, tuning: Tuning) -> tuple[Tensor, Launch]:
    """out [T_total, H, Dz] = decay * x @ state + (m or m^T) @ z per segment (see the kernel)."""
    T_total, H, DX = x.shape
    DZ = z.shape[-1]
    BZ = tuning.block_z or min(128, pow2(DZ))
    BK = min(tuning.block_k, pow2(DX))
    warps = tuning.num_warps or (8 if lay.C * BZ >= 128 * 128 else 4)
    # the state buffer is [n_seg, H, Dk, Dv]; as [Dx, Dz] it is read directly or transposed
    sx, sz = (1, DX) if transposed_state else (DZ, 1)
    out = torch.empty(T_total, H, DZ, dtype=z.dtype, device=z.device)
    args = dict(X=x, Z=z, M=m, STATES=states, OUT=out, LOG2_GAMMA=lg2, **lay.index_args(),
                STATE_SX=sx, STATE_SZ=sz)
    grid = (math.ceil(DZ / BZ) * (lay.S // lay.C), lay.n_seg, H)
    return out, Launch(segment_outputs_kernel, grid, args,
                       dict(H=H, DX=DX, DZ=DZ, BM=lay.C, BZ=BZ, BK=BK, REVERSE=reverse),
                       num_warps=warps, num_stages=tuning.num_stages)


def recurrent_block_v(DK: int, DV: int) -> int:
    """Value columns per program of the token-by-token kernels (recurrent, and the decoding step):
    the state tile [pow2(DK), BV] fp32 is 32 KiB of registers."""
    return max(16, min(pow2(DV), 8192 // pow2(DK)))


def recurrent(q: Tensor, k: Tensor, v: Tensor, lg2: Tensor, state_in: Tensor | None,
              state_out: Tensor | None) -> tuple[Tensor, Launch]:
    """o [B, T, H, DV] token by token; state_out (may be state_in: in place) gets the final state."""
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    DKP = pow2(DK)
    BV = recurrent_block_v(DK, DV)
    o = torch.empty_like(v)
    args = dict(Q=q, K=k, V=v, O=o, STATE_IN=state_in if state_in is not None else lg2,
                STATE_OUT=state_out if state_out is not None else lg2, LOG2_GAMMA=lg2, T=T)
    return o, Launch(recurrent_kernel, (math.ceil(DV / BV), B * H), args,
                     dict(H=H, DK=DK, DV=DV, DKP=DKP, BV=BV, HAS_STATE=state_in is not None,
                          STORE_STATE=state_out is not None), num_warps=4, num_stages=1)


# ---- the passes ----------------------------------------------------------------------------------

def forward(q: Tensor, k: Tensor, v: Tensor, lg2: Tensor, state0: Tensor | None, need_final: bool,
            lay: Layout, tuning: Tuning, run: Callable[[Launch], None] = execute):
    """q, k [T_total, H, DK], v [T_total, H, DV] -> (o, final state [N, H, DK, DV] fp32 or None, the
    segment states [n_seg, H, DK, DV] and the scores [T_total, H, S] (input dtype) for a backward
    that keeps them)."""
    A, launch = intra_scores(q, k, lg2, lay, tuning)
    run(launch)
    states, final, launch = segment_states(k, v, lg2, state0, need_final, lay, reverse=False, tuning=tuning)
    run(launch)
    o, launch = segment_outputs(q, v, A, states, False, lg2, lay, reverse=False, tuning=tuning)
    run(launch)
    return o, final, states, A


def backward(q: Tensor, k: Tensor, v: Tensor, lg2: Tensor, state0: Tensor | None, do: Tensor,
             dfinal: Tensor | None, need_dstate0: bool, lay: Layout, tuning: Tuning,
             run: Callable[[Launch], None] = execute, states: Tensor | None = None, scores: Tensor | None = None):
    """-> dq, dk, dv (input dtype), d(initial state) [N, H, DK, DV] fp32 or None.

    By default (states=None, scores=None; Tuning.keep_states and keep_scores off) the segment
    states and the scores are recomputed (a GEMM pass over k, v and one over q, k, about a fifth of
    the backward's FLOPs) rather than kept from the forward: kept, every layer would hold them until
    its backward, 2 * (DK * DV / S + S) bytes per token and head in bf16 (1.5 KiB at S = 256, d_k
    256, d_v 512), three quarters of what q, k and v themselves take. `states` and `scores` pass the
    forward's in.
    """
    if states is None:
        states, _, launch = segment_states(k, v, lg2, state0, False, lay, reverse=False, tuning=tuning)
        run(launch)
    # the gradient of the state leaving each segment: a reverse walk of the decayed q^T do sums
    grads, dstate0, launch = segment_states(q, do, lg2, dfinal, need_dstate0, lay, reverse=True, tuning=tuning)
    run(launch)
    A = scores
    if A is None:
        A, launch = intra_scores(q, k, lg2, lay, tuning)
        run(launch)
    dA, launch = intra_scores(do, v, lg2, lay, tuning)
    run(launch)
    dq, launch = segment_outputs(do, k, dA, states, True, lg2, lay, reverse=False, tuning=tuning)
    run(launch)
    dk, launch = segment_outputs(v, q, dA, grads, True, lg2, lay, reverse=True, tuning=tuning)
    run(launch)
    dv, launch = segment_outputs(k, do, A, grads, False, lg2, lay, reverse=True, tuning=tuning)
    run(launch)
    return dq, dk, dv, dstate0


def default_tuning(chunk: int = 64, rocm: bool = False) -> Tuning:
    # MI200: 64 KiB of shared memory, so no multi-buffered operand loads
    return Tuning(chunk=chunk, num_stages=1, states_stages=1) if rocm else Tuning(chunk=chunk)


def with_tuning(tuning: Tuning | None, chunk: int) -> Tuning:
    if tuning is None:
        return default_tuning(chunk, rocm=torch.version.hip is not None)
    return dataclasses.replace(tuning, chunk=chunk)
