"""Validation loss and perplexity per source, averaged over tokens and data-parallel ranks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from retnet_train.parallel import all_reduce_max, all_reduce_sum


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
            vocab_parallel: bool = False) -> torch.Tensor:
    """Next-token cross-entropy in fp32; labels == -100 are ignored. With `vocab_parallel`, logits
    are this tensor-parallel rank's vocabulary slice and the loss is computed across the group."""
    if vocab_parallel:
        from retnet_train.parallel.tensor_parallel import parallel_cross_entropy

        return parallel_cross_entropy(logits, labels, reduction=reduction)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction=reduction)


@torch.no_grad()
def evaluate(engine, val: dict[str, list[dict]], forward_kwargs: dict, device: torch.device,
             vocab_parallel: bool = False) -> dict[str, float]:
    """Every rank runs the same number of batches per source (ZeRO-3 forwards are collective)."""
    was_training = engine.training
    engine.eval()
    out: dict[str, float] = {}
    all_sum = all_count = 0.0
    for name in sorted(val):
        batches = val[name]
        n = int(-all_reduce_max([-float(len(batches))])[0])
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for batch in batches[:n]:
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            loss_sum += lm_loss(engine(ids, **forward_kwargs), labels, "sum", vocab_parallel).double()
            count += int((labels != -100).sum())
        total, tokens = all_reduce_sum([float(loss_sum), float(count)])
        if tokens:
            out[f"val/{name}/loss"] = total / tokens
            out[f"val/{name}/ppl"] = math.exp(min(total / tokens, 50.0))
        all_sum, all_count = all_sum + total, all_count + tokens
    if all_count:
        out["val/loss"] = all_sum / all_count
        out["val/ppl"] = math.exp(min(all_sum / all_count, 50.0))
    if was_training:
        engine.train()
    return out
