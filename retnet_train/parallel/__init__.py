"""Process groups. Every group the project uses is made in `groups.py`, nowhere else."""

from .groups import (
    ParallelState, all_gather_objects, all_reduce_max, all_reduce_sum, barrier, context_parallel, destroy, dp_group,
    get_state, init_distributed, mpu, world_max_on_host,
)

__all__ = ["ParallelState", "init_distributed", "get_state", "dp_group", "barrier", "all_reduce_sum",
           "all_reduce_max", "all_gather_objects", "destroy", "mpu", "context_parallel",
           "world_max_on_host"]
