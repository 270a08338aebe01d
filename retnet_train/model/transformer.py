"""The Transformer baseline the paper compares against: pre-norm blocks, causal SDPA attention with
rotary position, the same embedding / FFN / norm choices as RetNet, and a KV cache for decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import init
from .config import ModelConfig
from .layers import FeedForward, apply_rotary, cast_once_for_autocast, fuse_linears, fused_is_current, make_norm
from .lm import ForwardContext, LanguageModel


class StaticKVCache:
    """A preallocated KV cache, keys and values [B, max_len, H, D], written in place one token per
    step at each sequence's own position (gpt-fast style): no growth, no copies, fixed shapes for a
    CUDA graph. A step attends over all max_len slots with slots past each position masked."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    @classmethod
    def zeros(cls, batch: int, max_len: int, n_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> "StaticKVCache":
        shape = (batch, max_len, n_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def __getitem__(self, rows) -> "StaticKVCache":
        """The cache of some sequences (a view for a slice of rows, which a step updates in place)."""
        return StaticKVCache(self.k[rows], self.v[rows])

    def fill(self, rows: Tensor | slice, k: Tensor, v: Tensor, start: int = 0) -> None:
        """A prefill's keys and values [n, T, H, D] into rows (slots start .. start + T - 1)."""
        end = start + k.shape[1]
        if end > self.k.shape[1]:
            raise ValueError(f"{end} tokens do not fit a KV cache of max_len={self.k.shape[1]}")
        self.k[rows, start:end] = k.to(self.k.dtype)
        self.v[rows, start:end] = v.to(self.v.dtype)

    def attend_prefill(self, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
        """A prefill piece: q, k, v [B, T, H, D] of positions start .. start + T - 1, written into the
        cache, each query attending to every key up to its own -> [B, T, H, D]."""
        T = q.shape[1]
        self.fill(slice(None), k, v, start)
        if start == 0:  # the prompt's first piece: plain causal attention over its own keys
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
        else:  # query t (position start + t) sees the cached keys 0 .. start + t
            allowed = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[:, : start + T].transpose(1, 2),
                                                 self.v[:, : start + T].transpose(1, 2), attn_mask=allowed)
        return out.transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """q, k, v [B, 1, H, D] of the tokens at positions pos [B] -> attention output [B, 1, H, D]."""
        rows = torch.arange(q.shape[0], device=q.device)
        self.k[rows, pos] = k[:, 0].to(self.k.dtype)
        self.v[rows, pos] = v[:, 0].to(self.v.dtype)
        slots = torch.arange(self.k.shape[1], device=q.device)
        allowed = (slots[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, max_len]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2),
                                             attn_mask=allowed)
        return out.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, n_heads: int | None = None):
        super().__init__()
        self.n_heads = n_heads or cfg.n_heads
        self.head_dim = cfg.key_head_dim
        d, inner = cfg.d_model, self.n_heads * cfg.key_head_dim
        self.q_proj = nn.Linear(d, inner, bias=cfg.bias)
        self.k_proj = nn.Linear(d, inner, bias=cfg.bias)
        self.v_proj = nn.Linear(d, inner, bias=cfg.bias)
        self.out_proj = nn.Linear(inner, d, bias=cfg.bias)
        self.dropout_p = cfg.dropout
        self._fused = None  # (weight, bias) of q, k, v as one projection: fuse_projections

    def fuse_projections(self) -> None:
        """Inference: q, k and v in one matmul (their weights become views of one tensor)."""
        if not fused_is_current(self._fused, self.q_proj):  # fusing again would copy the weights once more
            self._fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def set_heads(self, n_heads: int, head_start: int) -> None:
        self.n_heads = n_heads

    def init_rules(self) -> dict[str, init.Rule]:
        """xavier-uniform with gain 2^-1/2 on q/k/v, unit gain on the output, zero biases (model/init.py)."""
        rules = {}
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            proj = getattr(self, name)
            gain = 1.0 if name == "out_proj" else 2 ** -0.5
            rules[f"{name}.weight"] = init.xavier_uniform(proj.out_features, proj.in_features, gain)
            rules[f"{name}.bias"] = init.constant(0.0)
        return rules

    def forward(self, x: Tensor, ctx: ForwardContext, cache: tuple[Tensor, ...] | None = None):
        """x [B, T, d]; cache (k, v) [B, T_past, H, D] (and, once documents were marked, the document
        index of each cached key [B, T_past]) -> ([B, T, d], new cache or None)"""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        sin, cos = ctx.rotary
        if self._fused is not None and (torch.compiler.is_compiling() or fused_is_current(self._fused, self.q_proj)):
            q, k, v = F.linear(x, *self._fused).split(H * D, dim=-1)
        else:
            xq, xk, xv = cast_once_for_autocast(x, [self.q_proj, self.k_proj, self.v_proj])
            q, k, v = self.q_proj(xq), self.k_proj(xk), self.v_proj(xv)
        q = apply_rotary(q.view(B, T, H, D), sin, cos)
        k = apply_rotary(k.view(B, T, H, D), sin, cos)
        v = v.reshape(B, T, H, D)
        if isinstance(cache, StaticKVCache):  # the inference engine: a prefill or a decoding step
            if T > 1:
                if not isinstance(ctx.offset, int):
                    raise ValueError("a static KV cache is prefilled at one position for all its rows (an int offset)")
                out = cache.attend_prefill(q, k, v, ctx.offset)
            else:
                pos = ctx.offset if isinstance(ctx.offset, Tensor) else torch.full((B,), ctx.offset, device=x.device)
                out = cache.attend(q, k, v, pos)
            return self.out_proj(out.reshape(B, T, H * D)), cache
        past_docs = cache[2] if cache is not None and len(cache) > 2 else None
        if cache is not None:
            k = torch.cat([cache[0], k], dim=1)
            v = torch.cat([cache[1], v], dim=1)
        past = k.shape[1] - T
        # [B, H, T, D] for SDPA
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dropout = self.dropout_p if self.training else 0.0
        docs = None
        if ctx.doc_starts is not None or past_docs is not None:
            # block-diagonal causal: query t sees the keys up to it in its own document
            base = past_docs[:, -1:] if past_docs is not None and past else torch.zeros(B, 1, dtype=torch.long, device=x.device)
            new_docs = base + (ctx.doc_starts.long().cumsum(1) if ctx.doc_starts is not None else 0)  # [B, T]
            if past_docs is None:
                past_docs = torch.zeros(B, past, dtype=torch.long, device=x.device)
            docs = torch.cat([past_docs, new_docs.expand(B, T)], dim=1)  # [B, past + T]
            causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            allowed = causal & (docs[:, None, :] == new_docs.expand(B, T)[:, :, None])  # [B, T, past + T]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed[:, None], dropout_p=dropout)
        elif past == 0:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, dropout_p=dropout)
        else:
            # query t (absolute past + t) sees keys 0 .. past + t
            allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(B, T, H * D)
        if not ctx.need_state:
            return self.out_proj(out), None
        return self.out_proj(out), ((k, v) if docs is None else (k, v, docs))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg, cfg.d_model)
        self.attention = CausalSelfAttention(cfg)
        self.ffn_norm = make_norm(cfg, cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def allocate_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> StaticKVCache:
        att = self.attention
        return StaticKVCache.zeros(batch, max_len, att.n_heads, att.head_dim, dtype, device)

    def forward(self, x: Tensor, ctx: ForwardContext, cache=None):
        y, new_cache = self.attention(self.attention_norm(x), ctx, cache)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, new_cache


class Transformer(LanguageModel):
    """Every mode computes the same full causal attention; "recurrent" feeds one token at a time
    through the KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [TransformerBlock(cfg) for _ in range(cfg.n_layers)])

    def forward(self, ids: Tensor, mode: str = "parallel", chunk_size: int | None = None,
                state=None, return_state: bool = False, return_hidden: bool = False,
                doc_starts: Tensor | None = None, context_parallel=None):
        if context_parallel is not None:
            raise ValueError("the Transformer baseline does not split sequences over ranks (context parallelism "
                             "is built for retention; attention would need ring attention): use parallel.cp=1")
        if mode != "recurrent" or ids.shape[1] == 1:
            return super().forward(ids, mode, chunk_size, state, return_state, return_hidden, doc_starts)
        outs = []
        for t in range(ids.shape[1]):
            starts = doc_starts[:, t:t + 1] if doc_starts is not None else None
            out, state = super().forward(ids[:, t:t + 1], mode, chunk_size, state, True, return_hidden, starts)
            outs.append(out)
        out = torch.cat(outs, dim=1)
        return (out, state) if return_state else out
