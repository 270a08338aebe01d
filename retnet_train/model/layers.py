"""Building blocks shared by RetNet and the Transformer baseline: norms, FFNs, rotary position."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import init
from .config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x), computed in fp32; optional per-channel weight."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def init_rules(self) -> dict[str, init.Rule]:
        return {"weight": init.constant(1.0)}

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out * self.weight if self.weight is not None else out


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class HeadNorm(nn.Module):
    """Normalises each head's output of each token on its own (no statistics across time).

    "groupnorm" is the paper's GroupNorm with one group per head (mean and variance over the head's
    d_v channels); "rmsnorm" is the official code's variant (no mean). fp32 inside.
    The affine weight is flat [heads * d_v], so a tensor-parallel slice of heads is a slice of it.
    """

    def __init__(self, n_heads: int, head_dim: int, kind: str, eps: float, affine: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.kind, self.eps = n_heads, head_dim, kind, eps
        width = n_heads * head_dim
        self.weight = nn.Parameter(torch.ones(width)) if affine else None
        self.bias = nn.Parameter(torch.zeros(width)) if affine and kind == "groupnorm" else None

    def init_rules(self) -> dict[str, init.Rule]:
        return {"weight": init.constant(1.0), "bias": init.constant(0.0)}

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, H, d_v] -> [B, T, H * d_v]"""
        B, T, H, Dv = x.shape
        xf = x.float()
        if self.kind == "groupnorm":
            xf = xf - xf.mean(-1, keepdim=True)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = out.reshape(B, T, H * Dv)
        if self.weight is not None:
            out = out * self.weight.float()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)


def activation(name: str):
    return F.silu if name == "swish" else F.gelu


def _act_backward(name: str, grad: Tensor, h: Tensor) -> Tensor:
    """d act(h) / dh * grad, by the same aten kernels autograd uses (so gradients are bit-identical)."""
    if name == "swish":
        return torch.ops.aten.silu_backward(grad, h)
    return torch.ops.aten.gelu_backward(grad, h)


def cast_once_for_autocast(x: Tensor, linears: list[nn.Module]) -> tuple[Tensor, ...]:
    """The inputs of `linears`, which all read x: under eager autocast, views of one copy of x in
    the autocast dtype; otherwise x itself. Autocast casts each op's input anew and eager autograd
    keeps every cast for its linear's weight gradient: q, k, v and g would keep four bf16 copies of
    the same norm output (3 x 2 bytes x d_model per token and layer more). The backward adds the
    readers' gradients in x's dtype (fp32), as the separate casts did. Only for plain nn.Linear: a
    tensor-parallel linear all-reduces its input's gradient, which must stay fp32. Compiled code
    merges the casts itself (and a Function returning views is best left out of its graphs)."""
    device, readers = x.device.type, len(linears)
    if (readers < 2 or torch.compiler.is_compiling() or not torch.is_autocast_enabled(device)
            or not x.is_floating_point() or any(type(m) is not nn.Linear for m in linears)):
        return (x,) * readers
    low = torch.get_autocast_dtype(device)
    if x.dtype == low:
        return (x,) * readers
    return _SharedCast.apply(x, low, readers)


class _SharedCast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype, readers):
        ctx.dtype = x.dtype
        copy = x.to(dtype)
        return tuple(copy.view_as(copy) for _ in range(readers))

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for g in grads:
            if g is not None:
                total = g.to(ctx.dtype) if total is None else total + g.to(ctx.dtype)
        return total, None, None


class _ActivationLinear(torch.autograd.Function):
    """fc2(act(h)) or, for the GLU, fc2(act(h) * gate): the activation in fp32, back to h's dtype.

    Saves only h [B, T, ffn] (and gate) and recomputes the hidden units in backward, where fc2's
    weight gradient needs them: autograd would also keep the fp32 copy of h, act(h), and (GLU) the
    product, i.e. 6 (GELU FFN) or 8 (GLU) bytes per hidden unit and token more in bf16. At
    retnet_1.3b, T = 32768, 24 layers: 6.4 GB of act(h) alone.
    """

    @staticmethod
    def forward(ctx, h, gate, weight, bias, name):
        y = F.linear(_hidden(h, gate, name), weight, bias)  # under autocast: the autocast dtype
        ctx.save_for_backward(h, gate, weight)
        ctx.name, ctx.compute_dtype, ctx.has_bias = name, y.dtype, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        h, gate, weight = ctx.saved_tensors
        dt = ctx.compute_dtype  # the dtype fc2 ran in (autocast casts the weight in forward)
        u = _hidden(h, gate, ctx.name).to(dt)
        dy = dy.to(dt)
        du = dy @ weight.to(dt)  # [B, T, ffn]
        dweight = (dy.flatten(0, -2).t() @ u.flatten(0, -2)).to(weight.dtype)
        dbias = dy.flatten(0, -2).sum(0) if ctx.has_bias else None
        if gate is None:
            dh, dgate = du.to(h.dtype), None
        else:
            a = activation(ctx.name)(h.float()).to(h.dtype)
            dgate = (du * a).to(gate.dtype)
            dh = (du * gate).to(h.dtype)
        dh = _act_backward(ctx.name, dh.float(), h.float()).to(h.dtype)
        return dh, dgate, dweight, (dbias.to(dy.dtype) if dbias is not None else None), None


def _hidden(h: Tensor, gate: Tensor | None, name: str) -> Tensor:
    a = activation(name)(h.float()).to(h.dtype)
    return a if gate is None else a * gate


class FeedForward(nn.Module):
    """Two-layer GELU FFN (paper), or a GLU: fc2(act(fc1 x) * gate x) (official code)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.d_model, cfg.ffn_width
        self.fc1 = nn.Linear(d, f, bias=cfg.bias)
        self.gate = nn.Linear(d, f, bias=cfg.bias) if cfg.ffn_type == "glu" else None
        self.fc2 = nn.Linear(f, d, bias=cfg.bias)
        self.act_name = cfg.glu_activation if self.gate is not None else "gelu"
        self.dropout = nn.Dropout(cfg.dropout)

    def init_rules(self) -> dict[str, init.Rule]:
        """nn.Linear's own init, U(+-1/sqrt(fan_in)) for weight and bias (model/init.py draws it)."""
        linears = {"fc1": self.fc1, "gate": self.gate, "fc2": self.fc2}
        return {f"{name}.{p}": init.linear_default(m.in_features)
                for name, m in linears.items() if m is not None for p in ("weight", "bias")}

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            x_fc1, x_gate = cast_once_for_autocast(x, [self.fc1, self.gate])  # one low-precision copy for both
            h, gate = self.fc1(x_fc1), self.gate(x_gate)
        else:
            h, gate = self.fc1(x), None
        # the activation runs in fp32 (as the official GLU does), then back to the compute dtype;
        # with fc2 a plain Linear whose weight is here (not tensor-parallel, not ZeRO-3 partitioned)
        # and no dropout between, the hidden units are recomputed in backward instead of stored
        fc2 = self.fc2
        if (type(fc2) is nn.Linear and not hasattr(fc2.weight, "ds_id")
                and not (self.training and self.dropout.p > 0)):
            return _ActivationLinear.apply(h, gate, fc2.weight, fc2.bias, self.act_name)
        return fc2(self.dropout(_hidden(h, gate, self.act_name)))


def fuse_linears(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """One weight [sum of outputs, in] (and bias) for linears that read the same input, with each
    linear's parameters turned into views of it: one matmul replaces several (at decoding batch
    sizes a small matmul cannot use the memory bandwidth), no weight is stored twice, and an
    in-place update of the parameters (load_state_dict, an optimizer) keeps the two in step. A
    later .to() of the module makes new parameters: fuse after it."""
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[start:start + n]
        if has_bias:
            m.bias.data = bias[start:start + n]
        start += n
    return weight, bias


def fused_is_current(fused: tuple[Tensor, Tensor | None] | None, first: nn.Linear) -> bool:
    """True while `first` (the first fused linear) still views the fused weight."""
    return fused is not None and first.weight.data_ptr() == fused[0].data_ptr()


def rotary_angles(head_dim: int, base: float, device: torch.device | None = None) -> Tensor:
    """Per-channel frequencies [head_dim], each repeated for its interleaved pair.

    Frequencies are base^-linspace(0, 1, head_dim/2), as in the official RetNet code. Built on
    `device` directly: a host-built table copied over would synchronise every call while decoding.
    """
    freqs = 1.0 / (base ** torch.linspace(0, 1, head_dim // 2, dtype=torch.float32, device=device))
    return freqs.repeat_interleave(2)


def rotary_sin_cos(head_dim: int, base: float, start: int | Tensor, length: int,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """sin, cos for absolute positions start .. start + length - 1, in fp32: [T, 1, head_dim] for
    an int start, [B, T, 1, head_dim] for a per-sequence start [B] (a ragged decoding batch).

    Built per call rather than kept in a buffer: a bf16 cast of the module (DeepSpeed's bf16 mode)
    would otherwise round the frequencies and scramble positions beyond a few hundred tokens.
    """
    pos = torch.arange(length, device=device, dtype=torch.float32)
    if isinstance(start, Tensor):
        return rotary_sin_cos_at(start.to(torch.float32)[:, None] + pos, head_dim, base)
    theta = (pos + start)[:, None] * rotary_angles(head_dim, base, device)[None, :]
    return theta.sin()[:, None, :], theta.cos()[:, None, :]


def rotary_sin_cos_at(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """sin, cos [B, T, 1, head_dim] fp32 for any positions [B, T] (per-document positions)."""
    theta = positions.to(torch.float32)[..., None] * rotary_angles(head_dim, base, positions.device)
    return theta.sin()[:, :, None, :], theta.cos()[:, :, None, :]


def document_positions(doc_starts: Tensor, offset: int | Tensor = 0) -> Tensor:
    """doc_starts bool [B, T] (true at each document's first token) -> each token's position within
    its document [B, T] (long); tokens before the first start continue from `offset` (an int, or
    [B] per sequence)."""
    T = doc_starts.shape[1]
    idx = torch.arange(T, device=doc_starts.device).expand_as(doc_starts)
    last_start = torch.where(doc_starts, idx, torch.full_like(idx, -1)).cummax(dim=1).values
    before = idx + (offset[:, None] if isinstance(offset, Tensor) else offset)
    return torch.where(last_start >= 0, idx - last_start, before)


def apply_rotary(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate interleaved channel pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). x [B, T, H, D]."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
