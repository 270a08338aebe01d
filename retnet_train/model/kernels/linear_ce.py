"""The LM loss from final hidden states and the LM head's weight, never holding the full logits.

    hidden [N, d], weight [V, d], labels [N] (ignore_index -100) -> mean (or sum) cross-entropy

Full logits cost N x V fp32 (plus their bf16 copy and gradient): at N = 32768 tokens and V = 32000,
4.2 GB each. Here tokens go through in chunks of `chunk_tokens`: a chunk's logits are made in fp32,
its loss and its gradient (softmax - one-hot) computed at once, and the logits dropped, so at most
one [chunk, V] fp32 block exists. The gradients of hidden and weight are finished in the forward
pass and scaled by the incoming gradient in backward (nothing recomputed).

`impl`: "torch" (this file, any device) or "liger" (liger-kernel's Triton fused linear
cross-entropy, CUDA). `chunked_head_cross_entropy` is the variant for a head that must be called as
a module (tensor-parallel vocabulary slices, ZeRO-3 partitioned weights): each token chunk runs the
head and the given loss under activation checkpointing, so its logits are recomputed in backward
instead of kept.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 2048  # [2048, 32000] fp32 logits: 262 MB per chunk


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk: int, grad: bool):
        """x [N, d], weight [V, d], labels [N] -> (sum of token losses fp32, count of counted tokens);
        `grad`: whether autograd is on outside (inside forward it is always off)"""
        want_dx, want_dw = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x) if want_dx else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_dw else None
        for s in range(0, x.shape[0], chunk):
            xc, lc = x[s:s + chunk], labels[s:s + chunk]
            # the matmul in the compute dtype, everything after it in fp32, as lm_head(x).float() does
            logits = (xc @ weight.t()).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)
            valid = lc != ignore_index
            safe = torch.where(valid, lc, torch.zeros_like(lc))
            target = logits.gather(1, safe[:, None]).squeeze(1)
            loss += torch.where(valid, lse - target, torch.zeros_like(lse)).sum()
            if want_dx or want_dw:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                grad.scatter_add_(1, safe[:, None], torch.full_like(target[:, None], -1.0))
                grad.mul_(valid[:, None])
                grad = grad.to(x.dtype)  # what autograd would hand the matmul
                if want_dx:
                    dx[s:s + chunk] = grad @ weight
                if want_dw:
                    dw += (grad.t() @ xc).float()
            del logits
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        count = (labels != ignore_index).sum()
        ctx.mark_non_differentiable(count)
        return loss, count

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_count):
        dx, dw = ctx.saved_tensors
        dx = dx * grad_loss.to(dx.dtype) if dx is not None else None
        dw = (dw * grad_loss).to(ctx.weight_dtype) if dw is not None else None
        return dx, dw, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str = "mean",
                         ignore_index: int = -100, impl: str = "torch", chunk_tokens: int | None = None) -> Tensor:
    """cross_entropy(hidden @ weight.T, labels) in fp32; hidden [..., d], labels [...]; "mean" over
    the tokens not ignored, or "sum"."""
    x, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        # fp32 accumulation of the weight gradient across chunks (liger's default is the weight's dtype)
        return liger_fused_linear_cross_entropy(x, weight, lab, ignore_index=ignore_index, reduction=reduction,
                                                accum_dtype=torch.float32)
    if impl != "torch":
        raise ValueError(f"linear cross-entropy impl={impl!r}: expected torch or liger")
    total, count = _ChunkedLinearCrossEntropy.apply(x, weight, lab, ignore_index, chunk_tokens or CHUNK_TOKENS,
                                                    torch.is_grad_enabled())
    return total if reduction == "sum" else total / count.clamp(min=1)


def chunked_head_cross_entropy(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor,
                               loss_sum: Callable[[Tensor, Tensor], Tensor] | None = None,
                               reduction: str = "mean", ignore_index: int = -100,
                               chunk_tokens: int | None = None) -> Tensor:
    """Sum over token chunks of loss_sum(head(hidden chunk [1, c, d]), labels chunk [1, c]), each
    chunk checkpointed; `loss_sum` returns the chunk's summed fp32 loss (default: F.cross_entropy)."""
    loss_sum = loss_sum or _cross_entropy_sum
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    x, lab = hidden.reshape(1, -1, hidden.shape[-1]), labels.reshape(1, -1)
    total = hidden.new_zeros((), dtype=torch.float32)
    # split, not slicing: autograd joins split's gradients with one cat, where each slice's backward
    # would fill a zero tensor of the whole hidden [1, T, d] and add it to the others (fp32, per chunk)
    for xc, lc in zip(x.split(chunk_tokens, dim=1), lab.split(chunk_tokens, dim=1)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, loss_sum, xc, lc, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, loss_sum, xc, lc)
    if reduction == "sum":
        return total
    return total / (lab != ignore_index).sum().clamp(min=1)


def _chunk_loss(head, loss_sum, x: Tensor, labels: Tensor) -> Tensor:
    return loss_sum(head(x), labels)


def _cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
