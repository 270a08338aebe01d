"""The decoding step of multi-scale retention in one kernel (retention_decode_kernel.py): the fused
q/k/v/g projection's output and the layer's fp32 state in, the gated head norm's output out, the
state updated in place. The inference engine's step takes it wherever our Triton kernels run
(model.kernels fla or triton on a GPU; triton under the interpreter in tests) and the model is
the paper's (swish gate, no torchscale score normalisation); elsewhere the unfused layers run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..retention_state import WindowedState
from . import triton_interpreted

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# per device, the kernel's arrival counters (one int32 per (sequence, head)); each launch leaves
# them at zero. Launches that use one device's counters must not run concurrently (two streams)
_ARRIVALS: dict[torch.device, Tensor] = {}
_MIN_COUNTERS = 1 << 16  # 256 KiB: batch x heads up to 65536 without growing


def runs_on(x: Tensor, kernels: str) -> bool:
    """True where the fused step can run on x (the projection's input): a GPU with our or fla's
    kernels chosen, or a CPU tensor under Triton's interpreter with kernels=triton (tests)."""
    return runs_with(x.device, x.dtype, kernels)


def runs_with(device: torch.device, dtype: torch.dtype, kernels: str) -> bool:
    """runs_on for inputs of `dtype` on `device`, before there is a tensor (the inference engine)."""
    if kernels == "torch" or dtype not in _DTYPES:
        return False
    return device.type == "cuda" or (kernels == "triton" and device.type == "cpu" and triton_interpreted())


def log2_decays(log_gamma: Tensor, device: torch.device) -> Tensor:
    """Our kernels' decays: log2(gamma) [H] fp32 from the float64 log(gamma); they take gamma^n as
    exp2(n * log2 gamma). (Cache it for decoding: converting it per layer costs two kernels.)"""
    return (log_gamma.to(device=device, dtype=torch.float64) / math.log(2.0)).to(torch.float32)


def decode_step(proj: Tensor, sin: Tensor, cos: Tensor, lg2: Tensor, state, norm, key_scale: float,
                position: int | Tensor | None = None) -> Tensor:
    """proj [B, 1, 2 H d_k + 2 H d_v] (q, k, v, g of H heads); sin, cos fp32 rotary tables of the
    token's position, [B, 1, 1, d_k] or one position for all [1, 1, d_k]; lg2 [H] (log2_decays); state
    [B, H, d_k, d_v] fp32, contiguous, updated in place, or a retention_state.WindowedState with
    position [B] (each sequence's position: which token of its window this is); norm: the HeadNorm
    -> y [B, 1, H d_v]."""
    windowed = isinstance(state, WindowedState)
    base = state.base if windowed else state
    B, H, DK, DV = base.shape
    if base.dtype != torch.float32 or not base.is_contiguous():
        raise ValueError(f"the decoding step updates the state in place: it must be contiguous float32, "
                         f"got {base.dtype} (contiguous={base.is_contiguous()})")
    if proj.shape != (B, 1, 2 * H * (DK + DV)):
        raise ValueError(f"projection output {tuple(proj.shape)} does not match a state of {H} heads "
                         f"[{B}, {H}, {DK}, {DV}]: expected [{B}, 1, {2 * H * (DK + DV)}]")
    if windowed:
        if position is None or not (state.keys.is_contiguous() and state.values.is_contiguous()):
            raise ValueError("a windowed decoding state needs each sequence's position and contiguous windows")
        pos = (base.new_full((B,), position, dtype=torch.long) if isinstance(position, int)
               else position.reshape(B).to(torch.long).contiguous())
        keys, values, start = state.keys, state.values, state.start
    else:  # empty stand-ins: the kernel's plain path never reads them
        keys = values = proj.new_empty(0)
        pos = start = base.new_empty(0, dtype=torch.long)
    sin, cos = (t.reshape(-1, DK).float().contiguous() for t in (sin, cos))
    y = torch.ops.retnet.retention_decode_step(proj.reshape(B, -1).contiguous(), sin, cos, lg2, base, keys, values,
                                              pos, start, norm.weight, norm.bias, norm.kind == "groupnorm",
                                              norm.eps, key_scale)
    return y.view(B, 1, H * DV)


@torch.library.custom_op("retnet::retention_decode_step", mutates_args=("state", "keys", "values"))
def _decode_step_op(proj: Tensor, sin: Tensor, cos: Tensor, lg2: Tensor, state: Tensor, keys: Tensor,
                    values: Tensor, position: Tensor, start: Tensor, weight: Tensor | None, bias: Tensor | None,
                    group: bool, eps: float, key_scale: float) -> Tensor:
    y, launch = launch_decode_step(proj, sin, cos, lg2, state, weight, bias, group, eps, key_scale,
                                   window=(keys, values, position, start) if keys.numel() else None)
    launch()
    return y


@_decode_step_op.register_fake
def _(proj, sin, cos, lg2, state, keys, values, position, start, weight, bias, group, eps, key_scale):
    B, H, _, DV = state.shape
    return proj.new_empty(B, H * DV)


def launch_decode_step(proj, sin, cos, lg2, state, weight, bias, group: bool, eps: float, key_scale: float,
                       arrivals: Tensor | None = None, block_v: int | None = None, num_warps: int = 4,
                       window: tuple | None = None):
    """(y [B, H d_v], its retention_launch.Launch). window: (keys [B, H, W, d_k], values
    [B, H, W, d_v], position [B], start [B]) of a WindowedState, or None (the state written every
    token). aot.py passes meta tensors and its own counters; bench/decode_kernel.py sweeps block_v
    (value columns per program) and num_warps."""
    from .retention_decode_kernel import decode_step_kernel  # imports triton: only where the kernel runs
    from .retention_launch import Launch, pow2, recurrent_block_v

    B, H, DK, DV = state.shape
    DKP = pow2(DK)
    BV = block_v or recurrent_block_v(DK, DV)
    y = proj.new_empty(B, H * DV)
    obuf = proj.new_empty(B * H, DV)
    keys, values, pos, start = window if window is not None else (proj, proj, lg2, lg2)  # unread stand-ins
    args = dict(X=proj, SIN=sin, COS=cos, STATE=state, KWIN=keys, VWIN=values, POS=pos, START=start,
                LOG2_GAMMA=lg2, W=weight, Bias=bias, OBUF=obuf,
                ARRIVALS=arrivals if arrivals is not None else _arrivals(proj.device, B * H), Y=y,
                x_row=proj.stride(0), sin_row=DK if sin.shape[0] > 1 else 0, key_scale=key_scale, eps=eps)
    constexprs = dict(H=H, DK=DK, DV=DV, DKP=DKP, DVP=pow2(DV), BV=BV,
                      WINDOW=keys.shape[2] if window is not None else 1, GROUP=group,
                      HAS_W=weight is not None, HAS_B=bias is not None)
    return y, Launch(decode_step_kernel, (math.ceil(DV / BV), B * H), args, constexprs, num_warps=num_warps,
                     num_stages=1)


def _arrivals(device: torch.device, n: int) -> Tensor:
    buf = _ARRIVALS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the decoding step's counters must exist before a CUDA graph captures it: "
                               "run the step once outside the capture (the engine's warm-up does)")
        buf = _ARRIVALS[device] = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
    return buf

