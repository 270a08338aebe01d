"""Megatron-style tensor parallelism applied from outside the model, with fairscale's layers.

Per block: the q/k/v/gate projections (and FFN fc1/gate) become column-parallel, each rank
computing `heads / tp` whole heads; the output projection (and FFN fc2) row-parallel, summing the
ranks' partial outputs. Embedding and LM head split the vocabulary; the loss is the
vocabulary-parallel cross-entropy, so no rank ever holds full-vocabulary logits.

Which parameter is split along which dimension is written once, in `split_dim`; sharding a model,
merging checkpoint shards and re-sharding at another `tp` all read it.
"""

from __future__ import annotations

import contextlib
import re
from typing import Mapping

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as mp
from fairscale.nn.model_parallel.cross_entropy import vocab_parallel_cross_entropy
from fairscale.nn.model_parallel.mappings import copy_to_model_parallel_region
from torch import Tensor, nn
from torch.nn.utils import get_total_norm
from torch.utils._python_dispatch import TorchDispatchMode

from ..model.layers import HeadNorm

_COLUMN = re.compile(r"\.(retention\.(q|k|v|g)_proj|attention\.(q|k|v)_proj|ffn\.(fc1|gate))\.(weight|bias)$")
_ROW = re.compile(r"\.(retention\.out_proj|attention\.out_proj|ffn\.fc2)\.weight$")
_HEAD_NORM = re.compile(r"\.retention\.head_norm\.(weight|bias)$")
_VOCAB = re.compile(r"^(embed|lm_head)\.weight$")


def split_dim(name: str) -> int | None:
    """Dimension along which parameter `name` is split across tensor-parallel ranks (None: replicated)."""
    if _COLUMN.search(name) or _HEAD_NORM.search(name) or _VOCAB.search(name):
        return 0
    if _ROW.search(name):
        return 1
    return None


def shard_state_dict(full: Mapping[str, Tensor], rank: int, tp: int) -> dict[str, Tensor]:
    """This rank's slice of a full (unsharded) state dict."""
    out = {}
    for name, tensor in full.items():
        dim = split_dim(name)
        out[name] = tensor if dim is None else tensor.chunk(tp, dim=dim)[rank].clone()
    return out


def shard_region(name: str, full_shape: tuple[int, ...], rank: int, tp: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, shape) of rank's slice of parameter `name` within its full tensor: the slice that
    shard_state_dict takes (`tensor.chunk(tp, dim)[rank]`; check_divisible makes the chunks equal)."""
    dim = split_dim(name)
    offsets, shape = [0] * len(full_shape), list(full_shape)
    if dim is not None and tp > 1:
        shape[dim] = full_shape[dim] // tp
        offsets[dim] = rank * shape[dim]
    return tuple(offsets), tuple(shape)


def merge_state_dicts(shards: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The full state dict from every rank's shard, in rank order."""
    out = {}
    for name in shards[0]:
        dim = split_dim(name)
        out[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return out


def check_divisible(cfg, tp: int, world_size: int | None = None) -> None:
    """Start-up check: every split dimension must divide by tp. Raises ValueError naming the key."""
    checks = {"model.n_heads": cfg.n_heads, "model.ffn_dim": cfg.ffn_width, "model.vocab_size": cfg.vocab_size}
    for key, value in checks.items():
        if value % tp:
            raise ValueError(f"parallel.tp={tp} does not divide {key}={value}")
    if world_size is not None and world_size % tp:
        raise ValueError(f"parallel.tp={tp} does not divide the world size {world_size}")


class _FactoriesOn(TorchDispatchMode):
    """Every tensor factory (empty, zeros, ...) allocates on `device`. fairscale 0.4's layers make their
    slice with the legacy `torch.Tensor(rows, cols)` and a full master weight with `torch.empty`; a
    `torch.device("meta")` context reaches only the second, so on a meta model each layer would
    allocate its slice on the host and fail to copy the meta master weight into it."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = self.device
        return func(*args, **kwargs)


class _NoInit:
    """fairscale builds a full master weight and calls init on it; weights are loaded after."""

    def __call__(self, weight: Tensor) -> Tensor:
        return weight


def _column(linear: nn.Linear, gather_output: bool = False) -> mp.ColumnParallelLinear:
    # fairscale allocates on the host; the slice moves to where the model was built, one layer at a time
    return mp.ColumnParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                   gather_output=gather_output, init_method=_NoInit()).to(linear.weight.device)


def _row(linear: nn.Linear) -> mp.RowParallelLinear:
    return mp.RowParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                input_is_parallel=True, init_method=_NoInit()).to(linear.weight.device)


class TiedParallelLMHead(nn.Module):
    """LM head sharing the vocabulary-parallel embedding's [vocab / tp, d] weight."""

    def __init__(self, embedding: mp.VocabParallelEmbedding):
        super().__init__()
        self._embedding = [embedding]  # a plain list: not a submodule, so its weight is saved once

    @property
    def weight(self) -> Tensor:
        return self._embedding[0].weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(copy_to_model_parallel_region(x), self.weight)


class ShardedDropout(nn.Module):
    """Dropout on activations that are split across tensor-parallel ranks (FFN hidden units): each
    rank draws its own mask from a generator seeded per tensor-parallel rank, while dropout on
    replicated activations keeps the default generator, seeded alike on the ranks of a group."""

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p = p
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        gen = self._generators.get(x.device)
        if gen is None:
            gen = self._generators[x.device] = torch.Generator(device=x.device).manual_seed(self.seed)
        keep = torch.rand(x.shape, generator=gen, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


def apply_tensor_parallel(model: nn.Module, tp_rank: int, tp_size: int, seed: int = 1234) -> nn.Module:
    """Shard a built (unsharded) model in place for rank `tp_rank` of a tensor-parallel group.

    fairscale's model-parallel groups must already be initialised (parallel/groups.py does it).
    The weights the model holds are sliced into the new layers, so every tp gives the same function.
    On a meta model (parallel/sharded_init.py) the new layers are meta too: nothing is allocated, and
    the caller materialises each slice.
    """
    if tp_size == 1:
        return model
    check_divisible(model.config, tp_size)
    device = model.embed.weight.device  # where the full model was built; the slices stay there
    full = None
    if device.type != "meta":
        full = {k: v.detach() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            full.pop("lm_head.weight", None)  # the same tensor as embed.weight
    with _FactoriesOn(device) if device.type == "meta" else contextlib.nullcontext():
        _swap_layers(model, tp_rank, tp_size, seed, device)
    if full is not None:
        model.load_state_dict(shard_state_dict(full, tp_rank, tp_size))
    mark_sharded_parameters(model)
    model.tensor_parallel = tp_size
    return model


def _swap_layers(model: nn.Module, tp_rank: int, tp_size: int, seed: int, device: torch.device) -> None:
    """Replace the model's layers by fairscale's parallel ones, with uninitialised weights."""
    heads = model.config.n_heads // tp_size
    for i, block in enumerate(model.layers):
        mixer = getattr(block, "retention", None) or getattr(block, "attention")
        names = ["q_proj", "k_proj", "v_proj"] + (["g_proj"] if hasattr(mixer, "g_proj") else [])
        for name in names:
            setattr(mixer, name, _column(getattr(mixer, name)))
        mixer.out_proj = _row(mixer.out_proj)
        if isinstance(getattr(mixer, "head_norm", None), HeadNorm):
            old = mixer.head_norm
            mixer.head_norm = HeadNorm(heads, old.head_dim, old.kind, old.eps, old.weight is not None).to(device)
        mixer.set_heads(heads, tp_rank * heads)
        ffn = block.ffn
        ffn.fc1 = _column(ffn.fc1)
        if ffn.gate is not None:
            ffn.gate = _column(ffn.gate)
        ffn.fc2 = _row(ffn.fc2)
        ffn.dropout = ShardedDropout(ffn.dropout.p, seed + 2718 + tp_rank + 1000 * i)
    tied = model.config.tie_embeddings
    model.embed = mp.VocabParallelEmbedding(model.config.vocab_size, model.config.d_model,
                                            init_method=_NoInit()).to(device)
    model.lm_head = TiedParallelLMHead(model.embed) if tied else _column(model.lm_head)


def mark_sharded_parameters(model: nn.Module) -> None:
    """Flag each parameter that holds a slice (`model_parallel`, the attribute DeepSpeed reads): a
    gradient norm sums flagged parameters over the tensor-parallel ranks and counts the replicated
    ones once. Unflagged, DeepSpeed counts only tensor-parallel rank 0's slices (a norm too small,
    so clipping too weak) and its bf16 optimizer fails on the other ranks with nothing to count."""
    for name, param in model.named_parameters():
        param.model_parallel = split_dim(name) is not None


def grad_norm(params: list[nn.Parameter], tp_group=None) -> Tensor:
    """The L2 norm of the whole model's gradient from one tensor-parallel rank's parameters:
    sharded ones summed over `tp_group`, replicated ones (the same on every rank) once."""
    sharded = [p.grad for p in params if p.grad is not None and getattr(p, "model_parallel", False)]
    replicated = [p.grad for p in params if p.grad is not None and not getattr(p, "model_parallel", False)]
    if not sharded:  # tp=1
        return get_total_norm(replicated)
    squares = get_total_norm(sharded) ** 2
    if tp_group is not None:
        torch.distributed.all_reduce(squares, group=tp_group)
    return (squares + get_total_norm(replicated) ** 2).sqrt()


def parallel_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Token loss ("mean" or "sum") from vocabulary-parallel logits [B, T, vocab / tp]; labels [B, T] (full ids)."""
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    # fairscale shifts the logits in place: give it a tensor nobody else reads
    logits = logits.clone() if logits.dtype == torch.float32 else logits.float()
    losses = vocab_parallel_cross_entropy(logits, safe)  # [B, T]
    total = (losses * mask).sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)
