"""Build a model where each rank holds only its shard, from the start.

The network is constructed on the meta device (shapes, no memory), tensor parallelism swaps its
layers there, and then each parameter is materialised as this rank's tensor-parallel slice, or with
ZeRO-3 only this rank's partition of that slice (parallel/zero3_init.py). The values come from
`InitValues` (model/init.py: a function of seed, name and index, so a slice equals the same slice
of the unsharded build) or `ExportValues` (an export's safetensors, read slice by slice). No rank
allocates the full model, nor (drawing) the full tensor of any sharded parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from .tensor_parallel import apply_tensor_parallel, shard_region

# (shape of the slice, fill(out, flat_start)) -> the parameter holding (its partition of) the slice
Partition = Callable[[tuple[int, ...], Callable[[Tensor, int], None]], nn.Parameter]


class Values(Protocol):
    def fill(self, name: str, out: Tensor, full_shape: tuple[int, ...], offsets: tuple[int, ...],
             view_shape: tuple[int, ...], flat_start: int) -> None:
        """out.view(-1) = elements flat_start .. of the view full[offsets : offsets + view_shape] of `name`."""


class InitValues:
    """The initial weights drawn from `seed` by the rules of the unsharded model (model/init.py)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.rules: dict = {}

    def plan(self, unsharded: nn.Module) -> None:
        from retnet_train.model.init import collect_rules

        self.rules = collect_rules(unsharded)  # the fans of the full shapes

    def fill(self, name, out, full_shape, offsets, view_shape, flat_start):
        from retnet_train.model.init import draw_, parameter_key

        draw_(out, self.rules[name], parameter_key(self.seed, name), full_shape, offsets, view_shape, flat_start)


class ExportValues:
    """An export's weights (model.safetensors), each rank reading only its slices from the file."""

    def __init__(self, weights_file: str | Path):
        from safetensors import safe_open

        self.path = str(weights_file)
        self.file = safe_open(self.path, framework="pt", device="cpu")
        self.names = set(self.file.keys())

    def plan(self, unsharded: nn.Module) -> None:
        missing = [n for n, _ in unsharded.named_parameters() if self._stored(n) not in self.names]
        if missing:
            raise ValueError(f"{self.path}: no tensor for the model's parameters {missing}")

    def _stored(self, name: str) -> str:
        # safetensors stores a shared tensor once: a tied LM head is the embedding
        return "embed.weight" if name == "lm_head.weight" and name not in self.names else name

    def fill(self, name, out, full_shape, offsets, view_shape, flat_start):
        stored = self.file.get_slice(self._stored(name))
        if tuple(stored.get_shape()) != tuple(full_shape):
            raise ValueError(f"{self.path}: {name} has shape {tuple(stored.get_shape())}, the model {tuple(full_shape)}")
        region = stored[tuple(slice(o, o + s) for o, s in zip(offsets, view_shape))]  # this rank's slice, host
        out.view(-1).copy_(region.reshape(-1)[flat_start:flat_start + out.numel()])


def build_sharded_model(model_cfg, values: Values, device: torch.device, tp_rank: int = 0, tp_size: int = 1,
                        dtype: torch.dtype = torch.float32, partition: Partition | None = None,
                        dropout_seed: int = 1234) -> nn.Module:
    """This rank's shard of the model `model_cfg` describes, on `device` (its ZeRO-3 partitions where
    `partition` puts them). Without tensor parallelism or ZeRO-3 the shard is the whole model."""
    from retnet_train.model import build_model
    from retnet_train.model.kernels import resolve_kernels

    with torch.device("meta"):
        model = build_model(model_cfg)
    model.kernels = resolve_kernels(model_cfg.kernels, device)  # for the device it runs on, not meta
    values.plan(model)
    full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if tp_size > 1:
        apply_tensor_parallel(model, tp_rank, tp_size, seed=dropout_seed)  # meta in, meta out
    made: dict[int, nn.Parameter] = {}  # id of the meta parameter -> its materialised replacement
    with torch.no_grad():
        for name, param in model.named_parameters():
            offsets, shape = shard_region(name, full_shapes[name], tp_rank, tp_size)
            if tuple(param.shape) != shape:
                raise RuntimeError(f"parallel/sharded_init.py: {name} is {tuple(param.shape)} on tensor-parallel "
                                   f"rank {tp_rank}, but its slice of {full_shapes[name]} is {shape}")

            def fill(out: Tensor, flat_start: int, name=name, offsets=offsets, shape=shape) -> None:
                values.fill(name, out, full_shapes[name], offsets, shape, flat_start)

            if partition is not None:
                new = partition(shape, fill)
            else:
                new = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=param.requires_grad)
                fill(new.data, 0)
            new.__dict__.update(param.__dict__)  # flags such as tensor parallelism's `model_parallel`
            made[id(param)] = new
    _replace_parameters(model, made)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"parallel/sharded_init.py: buffers {leftover} are still on the meta device")
    return model


def _replace_parameters(model: nn.Module, made: dict[int, nn.Parameter]) -> None:
    """Put each materialised parameter where its meta one was, in every module that holds it (a meta
    tensor cannot take real storage through `.data`; a tied weight sits in two modules)."""
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) in made:
                module._parameters[key] = made[id(param)]
