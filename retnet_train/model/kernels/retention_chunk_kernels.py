"""Triton kernels of chunkwise retention (constant decay gamma per head); launched by retention_launch.py.

Per head, with state S [Dk, Dv] and the convention S_t = gamma S_{t-1} + k_t^T v_t, o_t = q_t S_t:

The tokens of each sequence are cut into *segments* of S tokens (256 by default; a segment never
straddles a sequence boundary), and a token at position i of its segment (L tokens long) gets

  o_t = gamma^(i+1) q_t S_in  +  sum_{j <= i} gamma^(i-j) (q_t . k_j) v_j        (S_in: the state
  S_out = gamma^L S_in + sum_j gamma^(L-1-j) k_j^T v_j                            entering the segment)

so a segment is the parallel form inside and the recurrent form between segments. Three kernels:

  1. segment_states: one program per (state tile, sequence, head) walks the sequence's segments in
     order with the running state in fp32 registers; per segment it stores the state entering it
     (in the input dtype: it is a matmul operand) and adds the segment's decayed k^T v (a GEMM of
     K = S). Only one state per segment reaches memory (fla writes one per 64-token chunk, the
     dominant traffic at d_k 256 / d_v 512), and there is no separate scan pass over fp32 buffers.
  2. intra_scores: M = the decayed causal score matrix of each segment, [S, S] per segment and
     head in tiles of [BM, BM] (the tiles above the diagonal are neither computed nor read).
  3. segment_outputs: out = decay * X @ state + M @ Z, every [BM, BZ] output tile independent of
     the others (no sequential chunk walk): two GEMM loops, over the state's rows and over the
     segment's earlier (or, in reverse, later) tokens.

The same three kernels do the forward and all of the backward, with other operands:

  forward  A  = scores(q, k);   S_in = states(k, v);             o  = outputs(q, S_in, A, v)
  backward dA = scores(do, v);  G = states(q, do, REVERSE);      dq = outputs(do, S_in^T, dA, k)
                                                                 dk = outputs(v, G^T, dA^T, q, REVERSE)
                                                                 dv = outputs(k, G, A^T, do, REVERSE)
  with G the gradient of the state leaving each segment (a reverse walk that starts from the
  final state's gradient and ends with the initial state's).

FLOPs per token and head (forward, S = 256 in 64 x 64 tiles, d_k 256, d_v 512): 2 d_k d_v for the
states, 2 d_k d_v for q S_in, 2 * 160 (d_k + d_v) for the in-segment part (a row block meets the
tiles up to the diagonal: 160 of a segment's 256 columns on average); all of it in GEMM tiles.

Token tensors are [T_total, H, D] contiguous (the batch folded into time); M is [T_total, H, S];
segment states are [n_segments, H, Dk, Dv]. Decays are gamma^n = exp2(n * log2 gamma) in fp32.
Dots accumulate in fp32; input_precision "ieee" only matters for fp32 inputs (exact products for
tests; ROCm has no tf32).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _segment_range(seg, cu_seqlens, seg_seq, seg_first, T, N, S, VARLEN):
    """[bos, eos) token range (int64) of segment `seg`; empty for the padding entries of a varlen grid.

    VARLEN is a runtime flag (one compiled kernel for both layouts; a scalar branch per program)."""
    if VARLEN != 0:
        n = tl.load(seg_seq + seg)  # sequence of this segment; N for grid padding
        n_safe = tl.minimum(n, N - 1)
        seq_bos = tl.load(cu_seqlens + n_safe)
        seq_eos = tl.load(cu_seqlens + n_safe + 1)
        bos = seq_bos + (seg - tl.load(seg_first + n_safe)) * S
        eos = tl.where(n < N, tl.minimum(bos + S, seq_eos), bos)
    else:  # B sequences of T tokens each, cdiv(T, S) segments per sequence
        n_seg = tl.cdiv(T, S)
        n = seg // n_seg
        bos = n * T + (seg % n_seg) * S
        eos = tl.minimum(bos + S, n * T + T)
    return bos.to(tl.int64), eos.to(tl.int64)


@triton.jit
def intra_scores_kernel(X, Y, M, LOG2_GAMMA, cu_seqlens, seg_seq, seg_first, T, N, S, VARLEN,
                        H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                        N_BLOCKS: tl.constexpr):
    """M[t, h, j] = X_t . Y_(bos + j) * gamma^(i - j) for j <= i (i = t - bos), else 0.

    Grid (N_BLOCKS^2, segments, H): tile (row block rb, column block cb) of a segment's [S, S]
    matrix, N_BLOCKS = S // BM; the tiles with cb > rb return at once (never read downstream), the
    diagonal tiles hold zeros above the diagonal. X, Y [T_total, H, D]; M [T_total, H, S] in the
    input dtype (a matmul operand downstream). The contraction runs over D in blocks of BD.
    """
    tile, seg, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rb = tile // N_BLOCKS
    cb = tile % N_BLOCKS
    if cb > rb:
        return
    bos, eos = _segment_range(seg, cu_seqlens, seg_seq, seg_first, T, N, S, VARLEN)
    if bos + rb * BM >= eos:
        return
    i = tl.arange(0, BM)
    rows = bos + rb * BM + i
    cols = bos + cb * BM + i
    row_ok = rows < eos
    col_ok = cols < eos
    acc = tl.zeros([BM, BM], dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        x = tl.load(X + rows[:, None] * (H * D) + h * D + d[None, :], mask=row_ok[:, None] & (d < D)[None, :],
                    other=0.0)
        y = tl.load(Y + cols[:, None] * (H * D) + h * D + d[None, :], mask=col_ok[:, None] & (d < D)[None, :],
                    other=0.0)
        acc = tl.dot(x, tl.trans(y), acc, input_precision="ieee")
    diff = (rb * BM + i)[:, None] - (cb * BM + i)[None, :]
    # clamp the exponent: gamma^(i-j) above the diagonal would overflow before the where drops it
    decay = tl.exp2(tl.maximum(diff, 0).to(tl.float32) * tl.load(LOG2_GAMMA + h))
    acc = tl.where(diff >= 0, acc * decay, 0.0)
    tl.store(M + rows[:, None] * (H * S) + h * S + (cb * BM + i)[None, :], acc.to(M.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def segment_states_kernel(Y, Z, STATES, INIT, FINAL, LOG2_GAMMA, cu_seqlens, seg_first, T, S, VARLEN,
                          H: tl.constexpr, DY: tl.constexpr, DZ: tl.constexpr,
                          BY: tl.constexpr, BZ: tl.constexpr, BT: tl.constexpr, SB: tl.constexpr,
                          REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr):
    """STATES[m, h] = the running state r at segment m, r <- gamma^L r + sum_t w_t Y_t^T Z_t.

    Grid (tiles of [BY, BZ], N sequences, H). Forward (Y = k, Z = v) walks the segments first to
    last with w_t = gamma^(L-1-i): STATES[m] is the state entering segment m, FINAL the state after
    the last one. REVERSE (Y = q, Z = do) walks last to first with w_t = gamma^(i+1): STATES[m] is
    the gradient of the state leaving segment m, FINAL the gradient of the initial state. r starts
    at INIT [N, H, DY, DZ] (the initial state, or the final state's gradient) or 0; it is fp32 in
    registers throughout, STATES [n_seg, H, DY, DZ] has the input dtype, FINAL is fp32.

    One flat loop over the sequence's token blocks (SB = S / BT per segment; a segment's first block
    also stores and decays r) rather than a loop over segments around a loop over their blocks:
    the software pipeliner then prefetches across segment boundaries, where a nested inner loop of
    S / BT = 4 steps would drain and refill its pipeline every segment.
    """
    pid, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if VARLEN != 0:
        seq_bos = tl.load(cu_seqlens + n).to(tl.int64)
        seq_eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
        first = tl.load(seg_first + n)
        n_seg = tl.load(seg_first + n + 1) - first
    else:
        seq_bos = n.to(tl.int64) * T
        seq_eos = seq_bos + T
        n_seg = tl.cdiv(T, S)
        first = n * n_seg
    n_zb = tl.cdiv(DZ, BZ)
    ys = (pid // n_zb) * BY + tl.arange(0, BY)
    zs = (pid % n_zb) * BZ + tl.arange(0, BZ)
    y_ok = ys < DY
    z_ok = zs < DZ
    tile = ys[:, None] * DZ + zs[None, :]
    tile_ok = y_ok[:, None] & z_ok[None, :]
    nh = (n * H + h).to(tl.int64) * (DY * DZ)
    if HAS_INIT:
        r = tl.load(INIT + nh + tile, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        r = tl.zeros([BY, BZ], dtype=tl.float32)
    lg2 = tl.load(LOG2_GAMMA + h)
    bt = tl.arange(0, BT)
    for it in range(n_seg * SB):
        if REVERSE:
            m = n_seg - 1 - it // SB
        else:
            m = it // SB
        j = it % SB
        bos = seq_bos + m * S
        eos = tl.minimum(bos + S, seq_eos)
        if j == 0:
            tl.store(STATES + ((first + m).to(tl.int64) * H + h) * (DY * DZ) + tile,
                     r.to(STATES.dtype.element_ty), mask=tile_ok)
            r = r * tl.exp2((eos - bos).to(tl.float32) * lg2)
        t = bos + j * BT + bt
        ok = t < eos
        y_t = tl.load(Y + t[None, :] * (H * DY) + h * DY + ys[:, None], mask=y_ok[:, None] & ok[None, :],
                      other=0.0)  # [BY, BT]
        z = tl.load(Z + t[:, None] * (H * DZ) + h * DZ + zs[None, :], mask=ok[:, None] & z_ok[None, :],
                    other=0.0)  # [BT, BZ]
        if REVERSE:
            e = t - bos + 1
        else:
            e = eos - 1 - t
        w = tl.where(ok, tl.exp2(tl.maximum(e, 0).to(tl.float32) * lg2), 0.0)
        if BY < BZ:  # weight the smaller operand
            r = tl.dot((y_t * w[None, :]).to(y_t.dtype), z, r, input_precision="ieee")
        else:
            r = tl.dot(y_t, (z * w[:, None]).to(z.dtype), r, input_precision="ieee")
    if STORE_FINAL:
        tl.store(FINAL + nh + tile, r, mask=tile_ok)


@triton.jit
def segment_outputs_kernel(X, Z, M, STATES, OUT, LOG2_GAMMA, cu_seqlens, seg_seq, seg_first, T, N, S, VARLEN,
                           STATE_SX, STATE_SZ,
                           H: tl.constexpr, DX: tl.constexpr, DZ: tl.constexpr,
                           BM: tl.constexpr, BZ: tl.constexpr, BK: tl.constexpr, REVERSE: tl.constexpr):
    """OUT[rows, cols] = decay_x * X[rows] @ STATES[seg] + (M or M^T)[rows, segment] @ Z[segment].

    Grid (cdiv(DZ, BZ) * S // BM, segments, H): output tile [BM, BZ] of row block rb. X
    [T_total, H, DX]; Z, OUT [T_total, H, DZ]; M [T_total, H, S] from intra_scores; STATES
    [segments, H, ., .], element (x, z) of a segment's [DX, DZ] operand at x * STATE_SX + z * STATE_SZ
    (so one buffer serves as S or as S^T).

    Forward (position i in a segment of L): decay_x = gamma^(i+1) and the row block meets the column
    blocks 0..rb of M. REVERSE: decay_x = gamma^(L-1-i) and it meets blocks rb..last of M read
    transposed (tile[a, b] = M[token b, position a]): the later tokens' terms.
    """
    pid, seg, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_zb = tl.cdiv(DZ, BZ)
    rb = pid // n_zb
    zb = pid % n_zb
    bos, eos = _segment_range(seg, cu_seqlens, seg_seq, seg_first, T, N, S, VARLEN)
    if bos + rb * BM >= eos:
        return
    i = tl.arange(0, BM)
    pos = rb * BM + i  # positions in the segment
    rows = bos + pos
    row_ok = rows < eos
    zs = zb * BZ + tl.arange(0, BZ)
    z_ok = zs < DZ
    length = eos - bos

    # the state's part: X[rows] @ state, contracted over DX in steps of BK
    acc = tl.zeros([BM, BZ], dtype=tl.float32)
    p_state = STATES + (seg * H + h).to(tl.int64) * (DX * DZ) + zs[None, :] * STATE_SZ
    for k0 in range(0, DX, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < DX
        x = tl.load(X + rows[:, None] * (H * DX) + h * DX + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BM, BK]
        st = tl.load(p_state + ks[:, None] * STATE_SX, mask=k_ok[:, None] & z_ok[None, :], other=0.0)  # [BK, BZ]
        acc = tl.dot(x, st.to(x.dtype), acc, input_precision="ieee")
    if REVERSE:
        e = length - 1 - pos
    else:
        e = pos + 1
    acc = acc * tl.where(row_ok, tl.exp2(tl.maximum(e, 0).to(tl.float32) * tl.load(LOG2_GAMMA + h)), 0.0)[:, None]

    # the segment's part: the score tiles against Z, up to (or, in reverse, from) the diagonal
    if REVERSE:
        lo = rb
        hi = tl.cdiv(length, BM)
    else:
        lo = 0
        hi = rb + 1
    for cb in range(lo, hi):
        cols = bos + cb * BM + i
        col_ok = cols < eos
        if REVERSE:
            # tile[a, b] = M[token b, position a], loaded as M's own [token, position] block and
            # transposed in the dot: along the contiguous positions the mask (col_ok) is constant, so
            # the load vectorises and pipelines; loaded transposed, with the row mask varying along the
            # contiguous dimension, it was element by element and outside the pipeline (dk, dv). Rows
            # past the segment's end read positions the score kernel wrote as 0
            m = tl.trans(tl.load(M + cols[:, None] * (H * S) + h * S + pos[None, :], mask=col_ok[:, None],
                                 other=0.0))
        else:
            m = tl.load(M + rows[:, None] * (H * S) + h * S + (cb * BM + i)[None, :], mask=row_ok[:, None],
                        other=0.0)
        z = tl.load(Z + cols[:, None] * (H * DZ) + h * DZ + zs[None, :], mask=col_ok[:, None] & z_ok[None, :],
                    other=0.0)  # [BM, BZ]
        acc = tl.dot(m, z, acc, input_precision="ieee")
    tl.store(OUT + rows[:, None] * (H * DZ) + h * DZ + zs[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & z_ok[None, :])
