"""FLOPs and inference-memory arithmetic, for MFU and for the model summary.

Matmul FLOPs only (2 per multiply-add); training = 3x forward (backward is twice the forward).
Token mixing is counted as the chosen form computes it, with causal masks counted at half.
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


def mixing_flops_per_token(cfg: ModelConfig, seq_len: int, mode: str = "chunkwise") -> float:
    """Forward FLOPs per token of retention / attention, all layers."""
    d_k_total, d_v_total = cfg.d_model, cfg.value_width
    if cfg.arch == "transformer" or mode == "parallel":
        # scores and weighted sum over on average seq_len / 2 earlier tokens
        per_layer = 2 * (seq_len / 2) * (d_k_total + d_v_total)
    elif mode == "chunkwise":
        c = min(cfg.chunk_size, seq_len)
        state = cfg.n_heads * cfg.key_head_dim * cfg.value_head_dim
        per_layer = 2 * (c / 2) * (d_k_total + d_v_total) + 2 * 2 * state  # inner chunk; q.S and k^T v
    else:  # recurrent
        per_layer = 2 * 2 * cfg.n_heads * cfg.key_head_dim * cfg.value_head_dim
    return cfg.n_layers * per_layer


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, mode: str = "chunkwise") -> float:
    return 2 * matmul_params(cfg) + mixing_flops_per_token(cfg, seq_len, mode)


def training_flops_per_token(cfg: ModelConfig, seq_len: int, mode: str = "chunkwise") -> float:
    """Forward + backward FLOPs per trained token (for MFU)."""
    return 3 * forward_flops_per_token(cfg, seq_len, mode)


def recurrent_state_bytes(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """RetNet decoding memory per sequence: one [H, d_k, d_v] state per layer, whatever the context."""
    return cfg.n_layers * cfg.n_heads * cfg.key_head_dim * cfg.value_head_dim * bytes_per_value


def kv_cache_bytes(cfg: ModelConfig, context: int, bytes_per_value: int = 2) -> int:
    """Transformer decoding memory per sequence: keys and values of every layer and past token."""
    return 2 * cfg.n_layers * context * cfg.n_heads * cfg.key_head_dim * bytes_per_value
