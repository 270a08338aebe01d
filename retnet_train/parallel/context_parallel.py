"""Context parallelism: one sequence split over the ranks of a group (LASP-style for retention).

Rank r of a context-parallel group of R ranks holds tokens [r L, (r+1) L) of every sequence of
the micro-batch (L = T / R). Each retention layer runs its slice from a zero state, which also
gives the state the slice leaves (its summary, [B, H, d_k, d_v] fp32); the summaries are gathered
across the group (one all-gather per layer), each rank combines the earlier ranks' into its
incoming state (the decay across a whole slice is gamma^L) and adds what that state contributes to
its outputs. Gradients of the summaries flow back to the ranks that made them (the all-gather's
backward is an all-reduce of the gathered gradient, of which each rank keeps its own part).

The model only calls `all_gather` and reads `rank` / `size` (model/lm.py, model/retnet.py); the
groups are made in groups.py, the batch is sliced by the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


class _AllGather(torch.autograd.Function):
    """x [...] on each rank -> [R, ...] (every rank's x, in rank order), differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, group, rank: int, size: int) -> Tensor:
        ctx.group, ctx.rank = group, rank
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # every rank used the whole stack: x's gradient is the sum over ranks of their row `rank`
        # (an all-reduce rather than a reduce-scatter, which gloo does not have; R is small)
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


@dataclass(frozen=True)
class ContextParallel:
    """The context-parallel group of this rank: `rank` of `size`, `group` a torch process group."""

    group: object
    rank: int
    size: int

    def all_gather(self, x: Tensor) -> Tensor:
        """[...] -> [size, ...], with gradients."""
        if x.dtype == torch.bool:  # gloo gathers no bools; masks need no gradient
            return _AllGather.apply(x.to(torch.uint8), self.group, self.rank, self.size).bool()
        return _AllGather.apply(x, self.group, self.rank, self.size)

    def slice(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's consecutive part of x along `dim` (the sequence), which `size` must divide."""
        n = x.shape[dim]
        if n % self.size:
            raise ValueError(f"a sequence of {n} tokens does not split into parallel.cp={self.size} equal slices")
        part = n // self.size
        return x.narrow(dim, self.rank * part, part)
