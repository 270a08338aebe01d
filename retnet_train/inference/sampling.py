"""Sampling the next token on the device, with no host synchronisation and fixed shapes (so it runs
inside a CUDA graph), reproducible from a seed on any device and in any batch.

Randomness is counter-based: the uniform number for sequence `stream` at step `step` is a hash of
(seed, stream, step), computed with integer tensor ops. There is no generator state to advance or
capture, and a sequence draws the same numbers whatever batch it is decoded in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
# odd multipliers below 2^31: a 32-bit value times one fits int64 exactly on every device
_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of x, int64 holding values in [0, 2^32)."""
    for m in _MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * m) & _MASK32
    return x ^ (x >> 16)


def uniform(seed: Tensor, stream: Tensor, step: Tensor) -> Tensor:
    """A number in (0, 1) per element, a pure function of (seed, stream, step) (int64 tensors that
    broadcast). float64 with 24 random bits: enough for a vocabulary of any size in practice."""
    x = _mix32(seed & _MASK32)
    x = _mix32(x ^ (stream & _MASK32))
    x = _mix32(x ^ (step & _MASK32))
    return ((x >> 8).to(torch.float64) + 0.5) / float(1 << 24)


def sample_tokens(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, u: Tensor) -> Tensor:
    """logits [B, V] -> next ids [B] (long).

    Per sequence: temperature [B] (0: greedy, the argmax), top_k [B] (0: off), top_p [B] (1.0: off),
    u [B] its uniform number. The kept tokens are the top_k most likely whose mass before them is
    under top_p (the most likely is always kept); the choice is the inverse CDF of their
    renormalised probabilities at u. Shapes do not depend on the values, so a CUDA graph replays it
    with new settings written into the same tensors.
    """
    V = logits.shape[-1]
    greedy = logits.argmax(-1)
    scaled = logits.float() / temperature.clamp(min=1e-6)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V)
    keep = rank[None, :] < k[:, None]
    mass_before = probs.cumsum(-1) - probs
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep[:, 0] = True
    cdf = (probs * keep).cumsum(-1)  # [B, V], non-decreasing
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).clamp(max=V - 1)
    # a target past the last kept token's CDF (rounding) lands on a dropped one: step back onto the kept
    idx = torch.minimum(idx, (keep.sum(-1, keepdim=True) - 1))
    chosen = order.gather(-1, idx).squeeze(-1)
    return torch.where(temperature > 0, chosen, greedy)


class SamplingSettings:
    """The per-sequence settings of one generate call as device tensors [B]."""

    def __init__(self, batch: int, device: torch.device):
        self.temperature = torch.zeros(batch, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(batch, dtype=torch.long, device=device)
        self.top_p = torch.ones(batch, dtype=torch.float32, device=device)
        self.seed = torch.zeros(batch, dtype=torch.long, device=device)
        self.stream = torch.arange(batch, dtype=torch.long, device=device)

    def set(self, temperature: float, top_k: int, top_p: float, seed: int, streams=None) -> None:
        """One setting for every sequence; sequence i draws from stream streams[i] (default i)."""
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0: greedy)")
        if top_k < 0:
            raise ValueError(f"top_k={top_k} must be >= 0 (0: off)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1] (1.0: off)")
        self.temperature.fill_(temperature)
        self.top_k.fill_(top_k)
        self.top_p.fill_(top_p)
        self.seed.fill_(seed)
        self.stream.copy_(torch.arange(self.stream.numel()))
        if streams is not None:
            self.stream[: len(streams)] = torch.tensor(list(streams), dtype=torch.long)

    def select(self, rows: slice | Tensor) -> "SamplingSettings":
        """The settings of some sequences (views for a slice)."""
        view = SamplingSettings.__new__(SamplingSettings)
        for name in ("temperature", "top_k", "top_p", "seed", "stream"):
            setattr(view, name, getattr(self, name)[rows])
        return view

    def sample(self, logits: Tensor, step: Tensor) -> Tensor:
        """logits [n, V] of these n sequences, step a long tensor -> ids [n]."""
        u = uniform(self.seed, self.stream, step)
        return sample_tokens(logits, self.temperature, self.top_k, self.top_p, u)
