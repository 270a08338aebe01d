"""The retention output's per-head norm and swish gate in one Triton kernel: y = silu(g) * norm(o).

    o [B, T, H, d_v] (retention output), g [B, T, H * d_v] (gate projection) -> y [B, T, H * d_v]
    norm: GroupNorm with one group per head (mean and variance over d_v) or RMSNorm per head, fp32
    statistics, optional affine weight/bias of width H * d_v (HeadNorm in ../layers.py).

Why: in plain PyTorch the norm keeps several fp32 [B, T, H * d_v] intermediates for backward (the
fp32 copy, the centred values, the normalised values) plus the normalised and gated bf16 tensors.
The kernel keeps only its inputs o and g and two fp32 numbers per (token, head) (mean, 1/std); the
backward recomputes the normalised values from them. One read of o and g, one write of y.

Chosen with model.kernels = fla | triton (the retention kernels differ, this one is ours for both)
and a swish gate; `torch` or a GELU gate runs HeadNorm + the activation. Both are torch.library
custom ops, so torch.compile keeps one graph and selective checkpointing recomputes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..checkpointing import keep_matmul_outputs
from . import triton_interpreted


def runs_fused(o: Tensor, activation: str, kernels: str) -> bool:
    """True where the norm-gate kernel takes o: our or fla's kernels chosen, the swish gate, a GPU
    (or a CPU under Triton's interpreter: tests), not float64."""
    return (kernels != "torch" and activation == "swish" and o.dtype != torch.float64
            and (o.is_cuda or triton_interpreted()))


def gated_head_norm(o: Tensor, g: Tensor, norm, activation: str, kernels: str) -> Tensor:
    """act(g) * norm(o); `norm` is a HeadNorm (its weight, bias, kind and eps are used)."""
    if not runs_fused(o, activation, kernels):
        act = F.silu if activation == "swish" else F.gelu
        return act(g) * norm(o)
    B, T, H, D = o.shape
    y, _, _ = torch.ops.retnet.swish_gated_head_norm(
        o.contiguous(), g.reshape(B, T, H, D).contiguous(), norm.weight, norm.bias, norm.kind == "groupnorm", norm.eps)
    return y.reshape(B, T, H * D)


# ---- the custom ops --------------------------------------------------------------------------------

@torch.library.custom_op("retnet::swish_gated_head_norm", mutates_args=())
def _fwd(o: Tensor, g: Tensor, weight: Tensor | None, bias: Tensor | None, group: bool,
         eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """o, g [B, T, H, D] -> y [B, T, H, D] (o and g's promoted dtype), mean and 1/std [B * T * H] fp32."""
    from ._norm_gate_triton import forward

    return forward(o, g, weight, bias, group, eps)


@_fwd.register_fake
def _(o, g, weight, bias, group, eps):
    rows = o.numel() // o.shape[-1]
    stat = o.new_empty(rows, dtype=torch.float32)
    return o.new_empty(o.shape, dtype=torch.promote_types(o.dtype, g.dtype)), stat, stat.clone()


@torch.library.custom_op("retnet::swish_gated_head_norm_backward", mutates_args=())
def _bwd(dy: Tensor, o: Tensor, g: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
         rstd: Tensor, group: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> do, dg, dweight, dbias (the last two empty without an affine weight / bias)."""
    from ._norm_gate_triton import backward

    return backward(dy, o, g, weight, bias, mean, rstd, group)


@_bwd.register_fake
def _(dy, o, g, weight, bias, mean, rstd, group):
    dw = o.new_empty(weight.shape, dtype=weight.dtype) if weight is not None else o.new_empty(0)
    db = o.new_empty(bias.shape, dtype=bias.dtype) if bias is not None else o.new_empty(0)
    return torch.empty_like(o), torch.empty_like(g), dw, db


def _setup_context(ctx, inputs, output):
    o, g, weight, bias, group, _ = inputs
    _, mean, rstd = output
    ctx.group, ctx.has_weight, ctx.has_bias = group, weight is not None, bias is not None
    ctx.save_for_backward(o, g, weight, bias, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    o, g, weight, bias, mean, rstd = ctx.saved_tensors
    do, dg, dw, db = torch.ops.retnet.swish_gated_head_norm_backward(
        dy.contiguous(), o, g, weight, bias, mean, rstd, ctx.group)
    return do, dg, (dw if ctx.has_weight else None), (db if ctx.has_bias else None), None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- the head norm and gate with the output projection after it ------------------------------------

def gated_norm_projection(o: Tensor, g: Tensor, norm, out_proj, keep_output: bool = True) -> Tensor:
    """out_proj(silu(g) * norm(o)) for training, keeping o, g and the norm's statistics but not
    the gated output y [B, T, H * d_v], which the projection's weight gradient needs: the backward
    recomputes it (one more pass of the norm-gate kernel, as _ActivationLinear recomputes the FFN's
    hidden units). Autograd would keep y, 2 bytes per value channel and token in bf16: 3.2 GB at
    retnet_1.3b, 16k tokens, 24 layers. o [B, T, H, d_v], g [B, T, H * d_v]; out_proj a plain
    nn.Linear (the caller checks: not tensor-parallel, not ZeRO-3 partitioned).

    `keep_output` (compiled only): the region keeps the projection's output [B, T, d]. Where the
    block is fully checkpointed, or the compiler is given a memory budget, it must not (the block
    promises to keep only its input; the budget chooses for itself): RetNetBlock.plan_recompute."""
    if torch.compiler.is_compiling():
        # Traced, the Function's recompute of y reads only forward values, so the compiler's
        # partitioner runs it once, in the forward, and keeps y after all. A checkpointed region
        # is how a traced graph says "recompute": its partitioner keeps o, g and the weights and
        # recomputes the kernel. Told to recompute all of the region, the partitioner also re-ran
        # the projection in backward to rebuild the residual x + out for the next norm's backward
        # (one [T, H*d_v] x [H*d_v, d] matmul per layer: 6.6 TFLOP a step at retnet_1.3b, 16k
        # tokens), so where nothing else asks for recomputation the region keeps it
        if keep_output:
            return checkpoint(_norm_gate_then_projection, o, g, norm, out_proj, use_reentrant=False,
                              context_fn=keep_matmul_outputs)
        return checkpoint(_norm_gate_then_projection, o, g, norm, out_proj, use_reentrant=False)
    B, T, H, D = o.shape
    return _GatedNormProjection.apply(o.contiguous(), g.reshape(B, T, H, D).contiguous(), norm.weight, norm.bias,
                                      norm.kind == "groupnorm", norm.eps, out_proj.weight, out_proj.bias)


def _norm_gate_then_projection(o: Tensor, g: Tensor, norm, out_proj) -> Tensor:
    return out_proj(gated_head_norm(o, g, norm, "swish", kernels="triton"))


class _GatedNormProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, g, weight, bias, group, eps, proj_weight, proj_bias):
        B, T, H, D = o.shape
        y, mean, rstd = torch.ops.retnet.swish_gated_head_norm(o, g, weight, bias, group, eps)
        out = F.linear(y.reshape(B, T, H * D), proj_weight, proj_bias)  # under autocast: its dtype
        ctx.save_for_backward(o, g, weight, bias, mean, rstd, proj_weight)
        ctx.group, ctx.eps, ctx.compute_dtype = group, eps, out.dtype
        ctx.has = (weight is not None, bias is not None)
        ctx.bias_dtype = proj_bias.dtype if proj_bias is not None else None  # None: no projection bias
        return out

    @staticmethod
    def backward(ctx, dout):
        o, g, weight, bias, mean, rstd, proj_weight = ctx.saved_tensors
        B, T, H, D = o.shape
        dt = ctx.compute_dtype  # the dtype the projection ran in (autocast casts its weight)
        y, _, _ = torch.ops.retnet.swish_gated_head_norm(o, g, weight, bias, ctx.group, ctx.eps)
        dout = dout.to(dt).reshape(B * T, -1)
        y = y.to(dt).reshape(B * T, H * D)
        dproj_weight = (dout.t() @ y).to(proj_weight.dtype)
        dproj_bias = dout.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        dy = (dout @ proj_weight.to(dt)).reshape(B, T, H, D).to(y.dtype)
        do, dg, dw, db = torch.ops.retnet.swish_gated_head_norm_backward(dy.contiguous(), o, g, weight, bias, mean,
                                                                         rstd, ctx.group)
        return (do, dg, dw if ctx.has[0] else None, db if ctx.has[1] else None, None, None, dproj_weight,
                dproj_bias)
