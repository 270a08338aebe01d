"""Triton kernels of chunkwise retention (constant decay gamma per head); launched by retention_launch.py.

Per head, with state S [Dk, Dv] and the convention S_t = gamma S_{t-1} + k_t^T v_t, o_t = q_t S_t:

  The tokens of each sequence are cut into *segments* of S tokens (S a multiple of the chunk C;
  a segment never straddles a sequence boundary), segments into chunks of C tokens.
  1. segment_sums:  D_m = sum_t w_t Y_t^T Z_t over segment m, all segments in parallel (a GEMM).
  2. segment_scan:  the states at segment boundaries, one short sequential pass over segments.
  3. chunk_outputs: one program per (column block of Z, segment, head) starts from its segment's
     boundary state, walks the segment's chunks one by one with the state [Dx, BZ] held in
     registers (fp32), and writes out = decay * X @ state + M @ Z per chunk.
  intra_scores computes M, the decayed causal in-chunk score matrix, once per chunk.

So no per-chunk state ever goes to memory (fla writes one [Dk, Dv] state per chunk, the dominant
memory traffic at d_k 256 / d_v 512); only one fp32 state per segment does. The same four kernels
do the forward and all of the backward, with other operands and the time direction (REVERSE):

  forward  o  = chunk_outputs(X=q,  Y=k,  Z=v,  M=A,   state h  [Dk, Dv])
  backward dq = chunk_outputs(X=do, Y=v,  Z=k,  M=dA,  state h^T  [Dv, Dk])
           dk = chunk_outputs(X=v,  Y=do, Z=q,  M=dA^T, state dh^T [Dv, Dk], REVERSE)
           dv = chunk_outputs(X=k,  Y=q,  Z=do, M=A^T,  state dh  [Dk, Dv], REVERSE)
  with A[i, j] = q_i.k_j gamma^(i-j) and dA[i, j] = do_i.v_j gamma^(i-j) for j <= i in a chunk.

Token tensors are [T_total, H, D] contiguous (the batch folded into time); segment states are
[n_segments, H, Dx, Dz] fp32. Decays are gamma^n = exp2(n * log2 gamma), computed in fp32. Dots accumulate in fp32; their
input_precision "ieee" only matters for fp32 inputs (exact products for tests; ROCm has no tf32).
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
                        H: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                        BD: tl.constexpr, ):
    """M[t, h, j] = X_t . Y_(chunk start + j) * gamma^(i - j) for j <= i (i = t - chunk start), else 0.

    Grid (S // C, segments, H): one chunk each. X, Y [T_total, H, D]; M [T_total, H, C], the
    input dtype (it is a matmul operand downstream). The contraction runs over D in blocks of BD.
    """
    c, seg, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = _segment_range(seg, cu_seqlens, seg_seq, seg_first, T, N, S, VARLEN)
    t0 = bos + c * C
    if t0 >= eos:
        return
    i = tl.arange(0, C)
    rows = t0 + i
    in_chunk = i < eos - t0
    acc = tl.zeros([C, C], dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        mask = in_chunk[:, None] & (d < D)[None, :]
        x = tl.load(X + rows[:, None] * (H * D) + h * D + d[None, :], mask=mask, other=0.0)
        y = tl.load(Y + rows[:, None] * (H * D) + h * D + d[None, :], mask=mask, other=0.0)
        acc = tl.dot(x, tl.trans(y), acc, input_precision="ieee")
    diff = i[:, None] - i[None, :]
    # clamp the exponent: gamma^(i-j) above the diagonal would overflow before the where drops it
    decay = tl.exp2(tl.maximum(diff, 0).to(tl.float32) * tl.load(LOG2_GAMMA + h))
    acc = tl.where(diff >= 0, acc * decay, 0.0)
    tl.store(M + rows[:, None] * (H * C) + h * C + i[None, :], acc.to(M.dtype.element_ty),
             mask=in_chunk[:, None])


@triton.jit
def segment_sums_kernel(Y, Z, OUT, LOG2_GAMMA, cu_seqlens, seg_seq, seg_first, T, N, S, VARLEN,
                        H: tl.constexpr, DY: tl.constexpr, DZ: tl.constexpr,
                        BT: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr,
                        REVERSE: tl.constexpr, ):
    """OUT[m, h] = sum over segment m of w_t Y_t^T Z_t  ([DY, DZ] fp32 per segment and head).

    w_t = gamma^(eos - 1 - t) (forward: what the segment adds to the state at its end) or
    gamma^(t - bos + 1) (REVERSE: what it adds to the state gradient at its start).
    Grid (blocks of [BY, BZ], segments, H); the segment is read in steps of BT tokens.
    """
    pid, seg, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = _segment_range(seg, cu_seqlens, seg_seq, seg_first, T, N, S, VARLEN)
    if bos >= eos:
        return
    n_zb = tl.cdiv(DZ, BZ)
    ys = (pid // n_zb) * BY + tl.arange(0, BY)
    zs = (pid % n_zb) * BZ + tl.arange(0, BZ)
    lg2 = tl.load(LOG2_GAMMA + h)
    acc = tl.zeros([BY, BZ], dtype=tl.float32)
    for it in range(tl.cdiv(eos - bos, BT)):
        t = bos + it * BT + tl.arange(0, BT)
        in_seg = t < eos
        y_t = tl.load(Y + t[None, :] * (H * DY) + h * DY + ys[:, None],
                      mask=(ys < DY)[:, None] & in_seg[None, :], other=0.0)  # [BY, BT]
        z = tl.load(Z + t[:, None] * (H * DZ) + h * DZ + zs[None, :],
                    mask=in_seg[:, None] & (zs < DZ)[None, :], other=0.0)  # [BT, BZ]
        if REVERSE:
            n = t - bos + 1
        else:
            n = eos - 1 - t
        w = tl.where(in_seg, tl.exp2(tl.maximum(n, 0).to(tl.float32) * lg2), 0.0)
        acc = tl.dot(y_t, (z * w[:, None]).to(z.dtype), acc, input_precision="ieee")
    tl.store(OUT + ((seg * H + h) * DY + ys[:, None]) * DZ + zs[None, :], acc,
             mask=(ys < DY)[:, None] & (zs < DZ)[None, :])


@triton.jit
def segment_scan_kernel(BUF, LOG2_GAMMA, INIT, FINAL, cu_seqlens, seg_first, T, S, VARLEN,
                        H: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr,
                        REVERSE: tl.constexpr, HAS_INIT: tl.constexpr,
                        STORE_FINAL: tl.constexpr):
    """In place over BUF [n_segments, H, E] (E = Dy * Dz, fp32): segment sums -> boundary states.

    Walks the segments of one sequence (forward, or last to first if REVERSE) with a running
    state r (starting at INIT [N, H, E], or 0):  BUF[m] <- r;  r <- gamma^len(m) r + old BUF[m].
    Forward this turns D_m into the state entering segment m and leaves the final state in r;
    in reverse it turns Gamma_m into the state gradient leaving segment m and leaves d(initial
    state). Grid (cdiv(E, BLOCK), N * H); elementwise, fp32 throughout.
    """
    pid, nh = tl.program_id(0), tl.program_id(1)
    n = nh // H
    h = nh % H
    if VARLEN != 0:
        seq_len = tl.load(cu_seqlens + n + 1) - tl.load(cu_seqlens + n)
        first = tl.load(seg_first + n)
        n_seg = tl.load(seg_first + n + 1) - first
    else:
        seq_len = T
        n_seg = tl.cdiv(T, S)
        first = n * n_seg
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < E
    if HAS_INIT:
        r = tl.load(INIT + nh.to(tl.int64) * E + e, mask=mask, other=0.0).to(tl.float32)
    else:
        r = tl.zeros([BLOCK], dtype=tl.float32)
    lg2 = tl.load(LOG2_GAMMA + h)
    # the sums are read one segment ahead (their loads do not wait for the previous store), so a
    # program has a load in flight while it writes; otherwise each segment costs a memory round trip
    m = tl.where(REVERSE, n_seg - 1, 0)
    step = tl.where(REVERSE, -1, 1)
    nxt = BUF + ((first + m).to(tl.int64) * H + h) * E + e
    d = tl.load(nxt, mask=e < tl.where(n_seg > 0, E, 0), other=0.0)
    for it in range(n_seg):
        p = nxt
        length = tl.minimum(S, seq_len - m * S)
        m += step
        nxt = BUF + ((first + m).to(tl.int64) * H + h) * E + e
        d_next = tl.load(nxt, mask=e < tl.where(it + 1 < n_seg, E, 0), other=0.0)
        tl.store(p, r, mask=mask)
        r = r * tl.exp2(length.to(tl.float32) * lg2) + d
        d = d_next
    if STORE_FINAL:
        tl.store(FINAL + nh.to(tl.int64) * E + e, r, mask=mask)


@triton.jit
def chunk_outputs_kernel(X, Y, Z, M, STATE, OUT, LOG2_GAMMA, cu_seqlens, seg_seq, seg_first, T, N, S, VARLEN,
                         STATE_SX, STATE_SZ,
                         H: tl.constexpr, DX: tl.constexpr, DZ: tl.constexpr, DXP: tl.constexpr,
                         C: tl.constexpr, BZ: tl.constexpr,
                         REVERSE: tl.constexpr, ):
    """OUT = per chunk: decay_x * X @ state + M @ Z, the state carried across the segment's chunks.

    Grid (cdiv(DZ, BZ), segments, H). X, Y [T_total, H, DX]; Z, OUT [T_total, H, DZ];
    M [T_total, H, C] from intra_scores (read transposed if REVERSE); STATE [segments, H, ., .]
    fp32, element (x, z) of a segment's [DX, DZ] state at x * STATE_SX + z * STATE_SZ (so the
    same buffer serves as h or as h^T). The program's state tile [DXP, BZ] stays in registers.

    Forward chunks (positions i = 0..L-1): out_i = gamma^(i+1) X_i state + sum_j M[i, j] Z_j,
    then state <- gamma^L state + sum_j gamma^(L-1-j) Y_j^T Z_j. REVERSE walks the chunks last to
    first with the decays mirrored: gamma^(L-1-i) on X, gamma^(i+1) on Y, M transposed.
    """
    zb, seg, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = _segment_range(seg, cu_seqlens, seg_seq, seg_first, T, N, S, VARLEN)
    if bos >= eos:
        return
    xs = tl.arange(0, DXP)
    zs = zb * BZ + tl.arange(0, BZ)
    x_ok = xs < DX
    z_ok = zs < DZ
    p_state = STATE + (seg * H + h).to(tl.int64) * (DX * DZ) + xs[:, None] * STATE_SX + zs[None, :] * STATE_SZ
    state = tl.load(p_state, mask=x_ok[:, None] & z_ok[None, :], other=0.0)  # [DXP, BZ] fp32
    lg2 = tl.load(LOG2_GAMMA + h)
    i = tl.arange(0, C)
    n_chunks = tl.cdiv(eos - bos, C)
    for it in range(n_chunks):
        if REVERSE:
            c = n_chunks - 1 - it
        else:
            c = it
        t0 = bos + c * C
        length = tl.minimum(eos - t0, C)
        rows = t0 + i
        in_chunk = i < length
        x = tl.load(X + rows[:, None] * (H * DX) + h * DX + xs[None, :],
                    mask=in_chunk[:, None] & x_ok[None, :], other=0.0)  # [C, DXP]
        z = tl.load(Z + rows[:, None] * (H * DZ) + h * DZ + zs[None, :],
                    mask=in_chunk[:, None] & z_ok[None, :], other=0.0)  # [C, BZ]
        if REVERSE:  # tile[j, i] = M[t0 + i, h, j]: the scores of the later tokens i with token j
            m = tl.load(M + rows[None, :] * (H * C) + h * C + i[:, None], mask=in_chunk[None, :], other=0.0)
            n_x = length - 1 - i
            n_y = i + 1
        else:
            m = tl.load(M + rows[:, None] * (H * C) + h * C + i[None, :], mask=in_chunk[:, None], other=0.0)
            n_x = i + 1
            n_y = length - 1 - i
        dec_x = tl.where(in_chunk, tl.exp2(tl.maximum(n_x, 0).to(tl.float32) * lg2), 0.0)
        dec_y = tl.where(in_chunk, tl.exp2(tl.maximum(n_y, 0).to(tl.float32) * lg2), 0.0)
        # the state enters the matmul in the input dtype (bf16 on tensor cores), accumulation is fp32
        out = tl.dot(x, state.to(x.dtype), input_precision="ieee") * dec_x[:, None]
        out = tl.dot(m, z, out, input_precision="ieee")
        tl.store(OUT + rows[:, None] * (H * DZ) + h * DZ + zs[None, :], out.to(OUT.dtype.element_ty),
                 mask=in_chunk[:, None] & z_ok[None, :])
        if it < n_chunks - 1:  # the state after the segment's last chunk is nobody's input
            y = tl.load(Y + rows[:, None] * (H * DX) + h * DX + xs[None, :],
                        mask=in_chunk[:, None] & x_ok[None, :], other=0.0)  # [C, DXP]
            state = state * tl.exp2(length.to(tl.float32) * lg2)
            state = tl.dot(tl.trans(y), (z * dec_y[:, None]).to(z.dtype), state, input_precision="ieee")
