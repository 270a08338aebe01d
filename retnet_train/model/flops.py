"""FLOPs and inference-memory arithmetic, for MFU and for the model summary.

Matmul FLOPs only (2 per multiply-add); the backward pass is counted as twice the forward (each
matmul's two gradient matmuls), so training = 3x forward. Recomputation (activation checkpointing,
a kernel redoing part of its forward in backward) is not counted: these are model FLOPs.

Retention, per layer and head (d_k = K, d_v = V), in the chunk form with chunks of C tokens, counted
as the chunk kernels compute it (fla's chunk_simple_gla, our torch chunkwise form): each chunk does
    intra-chunk  Q_c K_c^T over the full C x C tile (masked after, not skipped)   2 C^2 K
                 (Q_c K_c^T * D) V_c, again the full tile                          2 C^2 V
    inter-chunk  Q_c S (the state entering the chunk)                               2 C K V
    state        K_c^T V_c (the chunk's contribution to the next state)             2 C K V
so 2C^2(K + V) + 4CKV per chunk, 2C(K + V) + 4KV per token; a last partial chunk of r tokens
counts r in place of C. The parallel form computes the full T x T product: 2T(K + V) per token.
Attention (SDPA, causal blocks skipped) is counted at half: 2 (T / 2) (K + V) per token.
These are the model's FLOPs whatever kernels run: our Triton kernels (kernels/retention_chunk_kernels.py)
compute the in-segment part over 256-token segments in 64 x 64 tiles of the lower triangle, 2 x 160
(K + V) per token instead of 2 x 64 (K + V), in exchange for a quarter of the states; MFU keeps the
chunk count above (chunk_size 64: about 1% of a 1.3B model's training FLOPs either way).
"""

from __future__ import annotations

from .config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that every token multiplies through: all projections plus the LM head."""
    d, v, f = cfg.d_model, cfg.value_width, cfg.ffn_width
    if cfg.arch == "retnet":
        mixing = 2 * d * d + 3 * d * v  # q, k (d -> d); v, g (d -> d_v); out (d_v -> d)
    else:
        mixing = 4 * d * d
    ffn = (3 if cfg.ffn_type == "glu" else 2) * d * f
    return cfg.n_layers * (mixing + ffn) + d * cfg.vocab_size


def chunk_retention_flops(T: int, K: int, V: int, C: int) -> int:
    """Forward FLOPs of one head's chunk form over one sequence of T tokens (the count above)."""
    n, r = divmod(T, C)
    return sum(2 * c * c * (K + V) + 4 * c * K * V for c in [C] * n + ([r] if r else []))


def retention_flops(cfg: ModelConfig, seq_len: int, mode: str = "chunkwise",
                    chunk_size: int | None = None) -> tuple[float, float]:
    """(forward, backward) FLOPs of one layer's retention over one sequence of seq_len tokens, all heads."""
    H, K, V, T = cfg.n_heads, cfg.key_head_dim, cfg.value_head_dim, seq_len
    if mode == "parallel":
        per_head = 2 * T * T * (K + V)
    elif mode == "chunkwise":
        per_head = chunk_retention_flops(T, K, V, chunk_size or cfg.chunk_size)
    elif mode == "recurrent":
        per_head = T * 4 * K * V  # S = gamma S + k^T v, o = q S
    else:
        raise ValueError(f"mode={mode!r} is not one of parallel, chunkwise, recurrent")
    forward = float(H * per_head)
    return forward, 2 * forward


def mixing_flops_per_token(cfg: ModelConfig, seq_len: int, mode: str = "chunkwise",
                           chunk_size: int | None = None) -> float:
    """Forward FLOPs per token of retention / attention, all layers."""
    if cfg.arch == "transformer":
        # scores and weighted sum over on average seq_len / 2 earlier tokens
        return cfg.n_layers * 2 * (seq_len / 2) * (cfg.d_model + cfg.value_width)
    return cfg.n_layers * retention_flops(cfg, seq_len, mode, chunk_size)[0] / seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, mode: str = "chunkwise",
                            chunk_size: int | None = None) -> float:
    return 2 * matmul_params(cfg) + mixing_flops_per_token(cfg, seq_len, mode, chunk_size)


def training_flops_per_token(cfg: ModelConfig, seq_len: int, mode: str = "chunkwise",
                             chunk_size: int | None = None) -> float:
    """Forward + backward (twice the forward) FLOPs per trained token (for MFU)."""
    return 3 * forward_flops_per_token(cfg, seq_len, mode, chunk_size)


def recurrent_state_bytes(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """RetNet decoding memory per sequence: one [H, d_k, d_v] state per layer, whatever the context."""
    return cfg.n_layers * cfg.n_heads * cfg.key_head_dim * cfg.value_head_dim * bytes_per_value


def kv_cache_bytes(cfg: ModelConfig, context: int, bytes_per_value: int = 2) -> int:
    """Transformer decoding memory per sequence: keys and values of every layer and past token."""
    return 2 * cfg.n_layers * context * cfg.n_heads * cfg.key_head_dim * bytes_per_value
