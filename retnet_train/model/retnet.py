"""RetNet (Sun et al. 2023): multi-scale retention blocks in a decoder-only language model.

    Y = GroupNorm_h(Retention(X W_Q, X W_K, X W_V; gamma_h))            per head h
    MSR(X) = (swish(X W_G) * Y) W_O
    block: X' = X + MSR(LN(X)),  X'' = X' + FFN(LN(X'))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import init
from .config import ModelConfig
from .kernels import decode_step as fused_decode
from .kernels.norm_gate import gated_head_norm, gated_norm_projection, runs_fused
import torch.nn.functional as F

from .layers import (FeedForward, HeadNorm, apply_rotary, cast_once_for_autocast, fuse_linears, fused_is_current,
                     make_norm)
from .lm import ForwardContext, LanguageModel, State
from .retention import carried_states, head_log_decays, past_contribution, retention
from .retention_state import WindowedState


class MultiScaleRetention(nn.Module):
    """Retention over `n_heads` heads, each with its own decay.

    `n_heads_total` and `head_start` place this module's heads among the model's: a tensor-parallel
    shard holds heads [head_start, head_start + n_heads) and must use those heads' decays.
    """

    def __init__(self, cfg: ModelConfig, n_heads: int | None = None, head_start: int = 0):
        super().__init__()
        self.cfg = cfg
        self.n_heads_total = cfg.n_heads
        self.n_heads = n_heads or cfg.n_heads
        self.head_start = head_start
        self.key_dim = cfg.key_head_dim
        self.value_dim = cfg.value_head_dim
        d, hk, hv = cfg.d_model, self.n_heads * self.key_dim, self.n_heads * self.value_dim
        self.q_proj = nn.Linear(d, hk, bias=cfg.bias)
        self.k_proj = nn.Linear(d, hk, bias=cfg.bias)
        self.v_proj = nn.Linear(d, hv, bias=cfg.bias)
        self.g_proj = nn.Linear(d, hv, bias=cfg.bias)
        self.out_proj = nn.Linear(hv, d, bias=cfg.bias)
        self.head_norm = HeadNorm(self.n_heads, self.value_dim, cfg.head_norm, cfg.head_norm_eps, cfg.head_norm_affine)
        self._fused = None  # (weight, bias) of q, k, v, g as one projection: fuse_projections
        self.projection_keeps_output = True  # compiled gated-norm projection: RetNetBlock.plan_recompute

    def fuse_projections(self) -> None:
        """Inference: q, k, v and g in one matmul (their weights become views of one tensor)."""
        if not fused_is_current(self._fused, self.q_proj):  # fusing again would copy the weights once more
            self._fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj, self.g_proj])

    def set_heads(self, n_heads: int, head_start: int) -> None:
        """Used by tensor parallelism after it has sliced the projections to these heads."""
        self.n_heads, self.head_start = n_heads, head_start

    @property
    def log_decay(self) -> Tensor:
        """log(gamma) of this module's heads [n_heads], float64, from their global indices."""
        return head_log_decays(self.n_heads_total, self.cfg.decay_schedule, self.head_start, self.n_heads)

    def _log_decay_on(self, device: torch.device, log2_fp32: bool = False) -> Tensor:
        """log_decay on `device` (or the decoding kernel's log2 of it in fp32), cached (not a buffer: a
        bf16 cast of the module must not round it)."""
        key = (device, self.n_heads, self.head_start, log2_fp32)
        if torch.compiler.is_compiling():  # read the cache, never write it: a dict update breaks the graph
            cached = self.__dict__.get("_decay_cache", {}).get(key)
            return cached if cached is not None else self._make_log_decay(device, log2_fp32)
        cache = self.__dict__.setdefault("_decay_cache", {})
        if key not in cache:
            if any(k[1:3] != key[1:3] for k in cache):  # the heads changed (tensor parallelism): drop all
                cache.clear()
            cache[key] = self._make_log_decay(device, log2_fp32)
        return cache[key]

    def _make_log_decay(self, device: torch.device, log2_fp32: bool) -> Tensor:
        log_decay = self.log_decay.to(device)
        return fused_decode.log2_decays(log_decay, device) if log2_fp32 else log_decay

    def init_rules(self) -> dict[str, init.Rule]:
        """The official initialisation: small xavier gain on q/k/v/g, unit gain on the output, zero biases
        (read by model/init.py, which draws the values; fans of the unsharded [out, in] weights)."""
        rules = {}
        for name in ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj"):
            proj = getattr(self, name)
            gain = 1.0 if name == "out_proj" else 2 ** -2.5
            rules[f"{name}.weight"] = init.xavier_uniform(proj.out_features, proj.in_features, gain)
            rules[f"{name}.bias"] = init.constant(0.0)
        return rules

    def forward(self, x: Tensor, ctx: ForwardContext, state: Tensor | None = None):
        """x [B, T, d] -> ([B, T, d], state [B, H, d_k, d_v(+1)] or None)"""
        B, T, _ = x.shape
        H = self.n_heads
        fused = self._fused is not None and (torch.compiler.is_compiling() or fused_is_current(self._fused, self.q_proj))
        if fused and self._decodes_in_one_kernel(x, ctx):
            # the inference engine's step: rotary, state update, output, head norm and gate in one kernel
            sin, cos = ctx.rotary
            y = fused_decode.decode_step(F.linear(x, *self._fused), sin, cos, self._log_decay_on(x.device, True),
                                         state, self.head_norm, self.key_dim ** -0.5, position=ctx.offset)
            return self.out_proj(y), state
        if fused:
            hk, hv = H * self.key_dim, H * self.value_dim
            q, k, v, g = F.linear(x, *self._fused).split([hk, hk, hv, hv], dim=-1)
        else:
            xq, xk, xv, xg = cast_once_for_autocast(x, [self.q_proj, self.k_proj, self.v_proj, self.g_proj])
            q, k, v, g = self.q_proj(xq), self.k_proj(xk), self.v_proj(xv), self.g_proj(xg)
        q = q.view(B, T, H, self.key_dim)
        k = k.view(B, T, H, self.key_dim)
        v = v.reshape(B, T, H, self.value_dim)

        sin, cos = ctx.rotary
        # the keys' 1/sqrt(d_k) rides on the rotation (a [T, 1, d_k] table), sparing a pass over k
        scale = self.key_dim ** -0.5
        q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin * scale, cos * scale)

        log_decay = self._log_decay_on(x.device)
        if self.cfg.score_norm == "torchscale":
            # a column of ones in v makes retention also return n_t = sum_s gamma^(t-s) q_t.k_s,
            # the score sum the official code divides by; it carries through every form and the state
            v = torch.cat([v, v.new_ones(B, T, H, 1)], dim=-1)
        cp = ctx.context_parallel
        o, new_state = retention(q, k, v, log_decay, ctx.mode, state, ctx.need_state or cp is not None, ctx.chunk_size,
                                 ctx.kernels, in_place=ctx.state_in_place, doc_starts=ctx.doc_starts,
                                 cu_seqlens=ctx.cu_seqlens, keep=ctx.retention_keep, position=ctx.offset)
        if cp is not None:
            # this slice ran from a zero state; new_state is what it leaves, its summary. The earlier
            # slices' summaries make its incoming state, whose part of the outputs is added here
            incoming = carried_states(cp.all_gather(new_state), log_decay, T, ctx.cp_resets)[cp.rank]
            o = o + past_contribution(q, incoming, log_decay, ctx.doc_starts)
            new_state = None
        if self.cfg.score_norm == "torchscale":  # its decay sums restart with each document too
            o = self._torchscale_normalise(o, log_decay, ctx.positions if ctx.positions is not None else ctx.offset)

        if self._projects_with_recompute(o, ctx):  # the same numbers, without keeping y for the backward
            return gated_norm_projection(o, g, self.head_norm, self.out_proj, self.projection_keeps_output), new_state
        y = gated_head_norm(o, g, self.head_norm, self.cfg.gate_activation, ctx.kernels)  # swish(g) * GroupNorm_h(o)
        return self.out_proj(y), new_state

    def _projects_with_recompute(self, o: Tensor, ctx: ForwardContext) -> bool:
        """Training through the norm-gate kernel into a plain output projection (not tensor-parallel,
        not ZeRO-3 partitioned: its weight is here): the backward recomputes the gated output."""
        out = self.out_proj
        return (torch.is_grad_enabled() and runs_fused(o, self.cfg.gate_activation, ctx.kernels)
                and type(out) is nn.Linear and not hasattr(out.weight, "ds_id"))

    def _decodes_in_one_kernel(self, x: Tensor, ctx: ForwardContext) -> bool:
        """One token into a state updated in place (the engine's step), the paper's gate and norm,
        and kernels that run here (kernels/decode_step.py)."""
        return (ctx.mode == "recurrent" and ctx.state_in_place and x.shape[1] == 1 and ctx.positions is None
                and self.one_kernel_step_fits() and fused_decode.runs_on(x, ctx.kernels))

    def one_kernel_step_fits(self) -> bool:
        """The layer's options that the one-kernel decoding step implements: the paper's swish gate,
        no torchscale score normalisation."""
        return self.cfg.score_norm != "torchscale" and self.cfg.gate_activation == "swish"

    def allocate_state(self, batch: int, device: torch.device) -> Tensor:
        """A zeroed fp32 state [B, H, d_k, d_v] (d_v + 1 with the torchscale score sum)."""
        width = self.value_dim + (1 if self.cfg.score_norm == "torchscale" else 0)
        return torch.zeros(batch, self.n_heads, self.key_dim, width, dtype=torch.float32, device=device)

    def _torchscale_normalise(self, o: Tensor, log_decay: Tensor, offset: int | Tensor) -> Tensor:
        """offset: the first token's position (int, or [B]), or every token's [B, T]."""
        """The official code's scalings: the decay mask's rows divided by sqrt(sum_s gamma^(t-s)),
        then the scores by max(|row sum|, 1) (detached). Both are per-token, per-head scalars, so the
        head norm almost cancels them; they keep activations bounded in low precision."""
        o, n = o[..., :-1], o[..., -1:]
        T = o.shape[1]
        # positions [1, T] (or [B, T] for per-sequence offsets [B], or the positions [B, T] themselves)
        pos = torch.arange(T, device=o.device, dtype=torch.float64)
        if isinstance(offset, Tensor) and offset.dim() == 2:
            pos = offset.to(torch.float64)
        else:
            pos = (offset.to(torch.float64)[:, None] if isinstance(offset, Tensor) else float(offset)) + pos[None]
        # sum_{s<=t} gamma^(t-s) = (1 - gamma^(t+1)) / (1 - gamma): [1 or B, T, H]
        row_sum = -torch.expm1((pos + 1)[..., None] * log_decay) / -torch.expm1(log_decay)
        row_scale = row_sum.sqrt().to(torch.float32 if o.dtype != torch.float64 else o.dtype)[..., None]
        denom = (n.detach().abs() / row_scale).clamp(min=1)
        return (o / row_scale / denom).to(o.dtype)


class RetNetBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.retention_norm = make_norm(cfg, cfg.d_model)
        self.retention = MultiScaleRetention(cfg)
        self.ffn_norm = make_norm(cfg, cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def allocate_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.retention.allocate_state(batch, device)  # constant size: max_len and dtype do not matter

    def plan_recompute(self, checkpointing: str, memory_budget: float | None) -> None:
        """Told by the model how this block is checkpointed and compiled: its compiled gated-norm
        projection keeps the projection's output unless the block is fully checkpointed (only its
        input may stay) or a memory budget leaves the choice to the compiler."""
        self.retention.projection_keeps_output = checkpointing != "full" and memory_budget is None

    def forward(self, x: Tensor, ctx: ForwardContext, state: Tensor | None = None):
        y, new_state = self.retention(self.retention_norm(x), ctx, state)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, new_state


class RetNet(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [RetNetBlock(cfg) for _ in range(cfg.n_layers)])

    def decodes_in_one_kernel(self, device: torch.device) -> bool:
        """Whether the inference engine's step on `device` runs the one-kernel decoding step
        (kernels/decode_step.py): our or fla's kernels on a GPU, and layers whose options it has."""
        return (device.type == "cuda" and fused_decode.runs_with(device, next(self.parameters()).dtype, self.kernels)
                and all(block.retention.one_kernel_step_fits() for block in self.layers))

    def allocate_state(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                       device: torch.device | None = None, state_window: int = 1) -> State:
        """LanguageModel.allocate_state; state_window > 1: each layer's state is a WindowedState,
        written back once every state_window tokens (retention_state.py), its keys and values in
        `dtype` (default: the model's)."""
        state = super().allocate_state(batch, max_len, dtype, device)
        if state_window == 1:
            return state
        p = next(self.parameters())
        # a start per layer: a layer's prefill restarts its own window, while the layers after it
        # still read theirs at the old start
        state.layers = [WindowedState.around(base, state_window, dtype or p.dtype,
                                             torch.zeros(batch, dtype=torch.long, device=base.device))
                        for base in state.layers]
        return state
