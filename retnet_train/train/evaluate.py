"""Validation loss and perplexity per source, averaged over tokens and data-parallel ranks."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from retnet_train.parallel import all_reduce_max, all_reduce_sum
from retnet_train.progress import Bar


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
            vocab_parallel: bool = False) -> torch.Tensor:
    """Next-token cross-entropy in fp32; labels == -100 are ignored. With `vocab_parallel`, logits
    are this tensor-parallel rank's vocabulary slice and the loss is computed across the group."""
    if vocab_parallel:
        from retnet_train.parallel.tensor_parallel import parallel_cross_entropy

        return parallel_cross_entropy(logits, labels, reduction=reduction)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction=reduction)


def lm_loss_from_hidden(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, reduction: str = "mean",
                        vocab_parallel: bool = False, kernels: str = "torch") -> torch.Tensor:
    """lm_loss(head(hidden), labels) without the full logits (trainer.fused_loss): hidden [B, T, d] are
    the model's final hidden states, `head` its LM head. Token chunks, fp32 math (kernels/linear_ce.py).

    The head's weight is used directly where it is whole on this rank; a vocabulary-parallel head
    (tp > 1) or a ZeRO-3 partitioned one is called as a module per chunk (which gathers / splits it)."""
    from retnet_train.model.kernels.linear_ce import chunked_head_cross_entropy, linear_cross_entropy

    if vocab_parallel:
        from retnet_train.parallel.tensor_parallel import parallel_cross_entropy

        def vocab_parallel_sum(logits, chunk_labels):
            return parallel_cross_entropy(logits, chunk_labels, reduction="sum")

        return chunked_head_cross_entropy(hidden, head, labels, vocab_parallel_sum, reduction)
    if hasattr(head.weight, "ds_id"):  # ZeRO-3: the weight is gathered only inside the head's forward
        return chunked_head_cross_entropy(hidden, head, labels, reduction=reduction)
    return linear_cross_entropy(hidden, head.weight, labels, reduction, impl=fused_loss_impl(hidden, kernels))


def loss_autocast(precision: str, device: torch.device):
    """The autocast that DeepSpeed applies inside the engine's forward (trainer.precision=bf16_autocast),
    for the loss computed outside it: trainer.fused_loss multiplies the final hidden states [B, T, d]
    by the fp32 LM head itself, and without this those matmuls ran in fp32 (retnet_1.3b at 8 x 2048
    on an H100: 136 of 432 ms per step). Other precisions: no change."""
    if precision != "bf16_autocast":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def fused_loss_impl(hidden: torch.Tensor, kernels: str) -> str:
    """liger-kernel's Triton kernel on a GPU when the model's kernels are not plain torch and liger
    imports; else the chunked torch version."""
    if kernels == "torch" or not hidden.is_cuda:
        return "torch"
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:
        return "torch"
    return "liger"


def document_starts(batch: dict, reset_at_documents: bool, device: torch.device) -> torch.Tensor | None:
    """The batch's doc_starts [B, T] on `device` when data.reset_at_documents is on (None otherwise,
    or for a stream without them, e.g. synthetic data)."""
    starts = batch.get("doc_starts") if reset_at_documents else None
    return None if starts is None else starts.to(device, non_blocking=True)


def model_inputs(batch: dict, forward_kwargs: dict, device: torch.device, reset_at_documents: bool,
                 context_parallel=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(ids, labels, forward kwargs) of one micro-batch on `device`: with document starts when
    data.reset_at_documents is on; with context parallelism, this rank's slice of every sequence
    and the group the model exchanges states with."""
    ids, labels = batch["input_ids"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)
    starts = document_starts(batch, reset_at_documents, device)
    fwd = dict(forward_kwargs)
    if context_parallel is not None:
        ids, labels = context_parallel.slice(ids), context_parallel.slice(labels)
        starts = None if starts is None else context_parallel.slice(starts)
        fwd["context_parallel"] = context_parallel
    if starts is not None:
        fwd["doc_starts"] = starts
    return ids, labels, fwd


@torch.no_grad()
def evaluate(engine, val: dict[str, list[dict]], forward_kwargs: dict, device: torch.device,
             vocab_parallel: bool = False, fused_loss: bool = False,
             reset_at_documents: bool = False, context_parallel=None, precision: str = "fp32") -> dict[str, float]:
    """Every rank runs the same number of batches per source (ZeRO-3 forwards are collective).
    precision: the trainer's (its autocast also covers the fused loss, see loss_autocast)."""
    was_training = engine.training
    engine.eval()
    out: dict[str, float] = {}
    all_sum = all_count = 0.0
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    bar = Bar("validation", total=sum(len(b) for b in val.values()), unit="batches", enabled=rank0)
    for name in sorted(val):
        batches = val[name]
        n = int(-all_reduce_max([-float(len(batches))])[0])
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for batch in batches[:n]:
            ids, labels, fwd = model_inputs(batch, forward_kwargs, device, reset_at_documents, context_parallel)
            if fused_loss:
                module = engine.module
                hidden = engine(ids, return_hidden=True, **fwd)
                with loss_autocast(precision, device):
                    loss = lm_loss_from_hidden(hidden, module.lm_head, labels, "sum", vocab_parallel, module.kernels)
            else:
                loss = lm_loss(engine(ids, **fwd), labels, "sum", vocab_parallel)
            loss_sum += loss.double()
            count += int((labels != -100).sum())
            bar.update()
        total, tokens = all_reduce_sum([float(loss_sum), float(count)])
        if tokens:
            out[f"val/{name}/loss"] = total / tokens
            out[f"val/{name}/ppl"] = math.exp(min(total / tokens, 50.0))
        all_sum, all_count = all_sum + total, all_count + tokens
    bar.close()
    if all_count:
        out["val/loss"] = all_sum / all_count
        out["val/ppl"] = math.exp(min(all_sum / all_count, 50.0))
    if was_training:
        engine.train()
    return out
