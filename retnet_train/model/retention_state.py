"""A RetNet layer's decoding state that is written back once every `window` tokens.

A decoding step must read the fp32 state S [B, H, d_k, d_v] (o = q S), but it need not write it
every token. With the state `base` as it stood c tokens ago and those c tokens' keys and values:

    S_t = gamma^(c+1) base + sum_{j<c} gamma^(c-j) k_j^T v_j + k_t^T v_t
    o_t = gamma^(c+1) q_t base + sum_{j<c} gamma^(c-j) (q_t . k_j) v_j + (q_t . k_t) v_t

so a step reads `base` and the window (a few KiB), and only the window's last step writes S_t back
as the new base. The state's traffic per token falls from a read and a write to a read and 1/window
of a write: at retnet_1.3b's batch 16 the state is 64 MiB per layer, two thirds of the layer's
100 MB of weights, so read and written it moved more bytes than the weights.

The count c of a sequence's tokens since its last write-back is (position - start) mod window,
start being the position where its prefill left the state (so no counter is written during a step
and the step's CUDA graph replays unchanged). window = 1 writes back every token: the plain state.
"""

from __future__ import annotations

import torch
from torch import Tensor


# the inference engine's window where its one-kernel step runs (a GPU): retnet_1.3b's step on an
# H100 took 2.51 ms at batch 16 with 4, 2.66 with 8, 2.93 written every token (bench/RESULTS.md,
# 2026-12-06); the kernel reads a window token by token, so longer ones cost more than they save
# (with the flush in one pass, one layer at batch 16: 39.9 us with 4, 39.5 with 8; at batch 1 7.2
# against 8.5 us)
DEFAULT_WINDOW = 4


class WindowedState:
    """base [B, H, d_k, d_v] fp32; keys [B, H, window, d_k], values [B, H, window, d_v] (the
    model's dtype: the rotated, scaled keys and the values exactly as the step computed them);
    start [B] long, the position each sequence's base belongs to (the layer's own: a prefill
    restarts one layer's window before the next layer reads its own)."""

    def __init__(self, base: Tensor, keys: Tensor, values: Tensor, start: Tensor):
        if base.dtype != torch.float32:
            raise ValueError(f"the retention state must be float32, got {base.dtype}")
        self.base, self.keys, self.values, self.start = base, keys, values, start

    @classmethod
    def around(cls, base: Tensor, window: int, dtype: torch.dtype, start: Tensor) -> "WindowedState":
        """A state around the (zeroed) base [B, H, d_k, d_v] with an empty window of `window` tokens."""
        if window < 1:
            raise ValueError(f"state window={window} must be >= 1 (1: the state is written every token)")
        B, H, DK, DV = base.shape
        return cls(base, base.new_zeros(B, H, window, DK, dtype=dtype), base.new_zeros(B, H, window, DV, dtype=dtype),
                   start)

    @property
    def window(self) -> int:
        return self.keys.shape[2]

    def __getitem__(self, rows) -> "WindowedState":
        """Some sequences' state (views for a slice of rows, which a step updates in place)."""
        return WindowedState(self.base[rows], self.keys[rows], self.values[rows], self.start[rows])

    def zero_(self) -> "WindowedState":
        for t in (self.base, self.keys, self.values, self.start):
            t.zero_()
        return self

    def restart_at(self, position: int | Tensor) -> None:
        """The base now holds the whole state at `position` (a prefill wrote it): an empty window."""
        if isinstance(position, int):
            self.start.fill_(position)
        else:
            self.start.copy_(position)

    def counts(self, position: Tensor) -> Tensor:
        """[B] tokens held in each sequence's window when its token at `position` [B] arrives."""
        return torch.remainder(position - self.start, self.window)

    def materialize(self, position: Tensor, log_gamma: Tensor) -> Tensor:
        """The whole state [B, H, d_k, d_v] fp32 before the token at `position` [B] (a copy)."""
        c = self.counts(position).to(self.base.device)
        lg = log_gamma.to(device=self.base.device, dtype=torch.float64)
        j = torch.arange(self.window, device=self.base.device)
        # token j of the window is c - 1 - j tokens before the newest: weight gamma^(c-1-j), j < c
        age = (c[:, None] - 1 - j[None, :]).to(torch.float64)[:, None, :]  # [B, 1, W]
        w = torch.where(age >= 0, torch.exp(age * lg[None, :, None]), 0.0).float()  # [B, H, W]
        recent = torch.einsum("bhw,bhwk,bhwv->bhkv", w, self.keys.float(), self.values.float())
        return torch.exp(c[:, None].double() * lg[None, :]).float()[..., None, None] * self.base + recent
