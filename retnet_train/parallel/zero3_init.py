"""ZeRO-3 partitioning at construction: each parameter goes straight into this rank's partition.

What `deepspeed.zero.Init` does to a module built inside it, done to one parameter at a time of a
meta-built model: the parameter becomes a ZeRO-3 parameter of DeepSpeed's Init (same data-parallel
group, dtype and offload device as the engine's), and only this rank's partition (a flat range of
the parameter: ceil(numel / dp) elements, zero padded) is allocated and filled; the parameter's own
storage stays empty. deepspeed.initialize then finds every parameter partitioned already.

The fill skips `zero.Init`'s broadcast from rank 0: the values are a function of (seed, name, index)
or read from a file, identical on every rank by construction.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class Zero3Partitioner:
    def __init__(self, ds_config: dict, mpu=None):
        import deepspeed

        group = mpu.get_data_parallel_group() if mpu is not None else None
        # not entered as a context: nothing here patches torch or nn.Module; the object holds the
        # group, dtype and devices, and the all-gather / partition methods the parameters will call
        self.init = deepspeed.zero.Init(data_parallel_group=group, config_dict_or_path=ds_config, mpu=mpu)
        self.dtype = self.init.dtype
        # what this partitioning does not do: NVMe swapping, hpZ's secondary partitions (which DeepSpeed
        # cuts from the full parameter), quantised weights
        unsupported = {"offload_param.device=nvme": self.init.remote_device == "nvme",
                       "zero_hpz_partition_size > 1": self.init.zero_param_process_group is not None,
                       "zero_quantized_weights": bool(self.init.quantized_weights or
                                                      self.init.quantized_nontrainable_weights)}
        if any(unsupported.values()):
            raise ValueError(f"deepspeed config {[k for k, v in unsupported.items() if v]}: partitioning at "
                             f"construction (parallel/zero3_init.py) does not support it")
        self.elements = 0  # of this rank's partitions, padding included

    def __call__(self, shape: tuple[int, ...], fill: Callable[[Tensor, int], None]) -> nn.Parameter:
        """A ZeRO-3 parameter of `shape` (this rank's tensor-parallel slice) holding only this rank's
        partition; fill(out, flat_start) writes the slice's flattened elements flat_start ..
        flat_start + out.numel() into out."""
        from deepspeed.runtime.zero.partition_parameters import OffloadDeviceEnum, PartitionedParamStatus

        init = self.init
        # the shape without the memory (one element, strides 0) until DeepSpeed has read it
        param = nn.Parameter(torch.empty((), dtype=self.dtype, device=init.local_device).expand(shape))
        init._convert_to_deepspeed_param(param)  # ds_shape, ds_numel, ds_id, the gather/partition methods
        world, rank = init._partition_world_size(param), init._partition_rank(param)
        aligned = init._aligned_size(param)  # numel rounded up to a multiple of world
        size = aligned // world
        device = init.local_device if param.ds_persist else init.remote_device
        part = torch.empty(size, dtype=self.dtype, device=device)
        if device == OffloadDeviceEnum.cpu and init.pin_memory:
            part = part.pin_memory()
        start = rank * size
        valid = max(0, min(size, param.ds_numel - start))  # the last partitions hold padding
        if valid:
            fill(part[:valid], start)
        part[valid:].zero_()
        # the fields DeepSpeed's _partition_param sets on a partition it allocates
        part.requires_grad = False
        part.ds_numel = size
        part.status = PartitionedParamStatus.AVAILABLE
        part.final_location = None
        param.ds_tensor = part
        param.ds_numel_aligned = aligned
        # the parameter's storage: empty, on the device its gathered values will be put on
        param.data = torch.empty(0, dtype=self.dtype, device=init.local_device)
        param.partition()  # finds ds_tensor in place: marks the parameter NOT_AVAILABLE
        self.elements += size
        return param
