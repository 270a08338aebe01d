"""Starting torch.distributed (through DeepSpeed) and making the process groups.

This is the one place that splits the world into tensor-parallel, context-parallel and
data-parallel groups and hands DeepSpeed an `mpu`. Layout: rank = (d * cp + c) * tp + t, so
consecutive ranks share a tensor-parallel group (Megatron), the cp ranks of one sequence are next
(t fixed), then data-parallel replicas d. ZeRO shards and averages gradients over the ranks with
the same t (dp x cp of them: the weights are replicated across both); the data stream splits over
the dp replicas only (`data_rank`, `data_size`): the ranks of a context-parallel group read the same
samples and each keeps its slice of every sequence.
Works for all launchers: plain `python -m` (one process, no env), torchrun and the deepspeed
launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    tp_size: int
    device: torch.device
    backend: str
    tp_rank: int = 0
    cp_size: int = 1
    cp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel replica: which share of the samples it reads."""
        return self.dp_rank // self.cp_size

    @property
    def data_size(self) -> int:
        return self.dp_size // self.cp_size


_state: Optional[ParallelState] = None
_dp_group = None
_context_parallel = None  # a ContextParallel when parallel.cp > 1
_host_group = None  # every rank, through gloo on host memory: decisions that must not wait for the GPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """A plain `python -m retnet_train` is a world of one; give torch.distributed what it needs."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _no_shared_memory_comm_build() -> None:
    """DeepSpeed's CPU backend compiles a C++ shared-memory all-reduce at every start (65 s to
    3 min, needs a C++ compiler, and waits forever on the build's lock file if an earlier start
    was killed while compiling). Only DeepSpeed-Inference's `inference_all_reduce` uses it; training
    reduces through the gloo process group. So the op is not built: gloo does all the work."""
    import importlib

    # (`import deepspeed.comm.torch as m` would bind the torch package: deepspeed.comm has an
    # attribute `torch` that shadows its submodule of that name)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def check_backend(backend: str) -> None:
    """parallel.backend=nccl where torch has no NCCL or there is no GPU: torch's own error (raised
    deep in init_process_group) does not say which setting asked for NCCL, so name it here."""
    if backend != "nccl":
        return
    missing = [what for what, there in (("NCCL in its torch build", dist.is_nccl_available()),
                                        ("CUDA GPU", torch.cuda.is_available())) if not there]
    if missing:
        from retnet_train.config import ConfigError

        raise ConfigError(f"parallel.backend=nccl needs NCCL and a CUDA GPU; this machine has no "
                          f"{' and no '.join(missing)} (use parallel.backend=gloo or auto)")


def init_distributed(device: str = "auto", backend: str = "auto", tp_size: int = 1,
                     timeout_minutes: int = 30, cp_size: int = 1, host_group: bool = True) -> ParallelState:
    """Start the default process group (idempotent) and build the data-parallel group (and, with
    `host_group`, the gloo group of world_max_on_host)."""
    global _state, _dp_group, _context_parallel, _host_group
    if _state is not None:
        return _state
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():  # else torch fails deep in set_device
        from retnet_train.config import ConfigError

        raise ConfigError("trainer.device=cuda: CUDA is not available on this machine (trainer.device=auto or cpu)")
    check_backend(backend)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _no_shared_memory_comm_build()
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    _single_process_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                               verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"parallel.tp={tp_size} does not divide the world size {world}")
    if world % (tp_size * cp_size):
        raise ValueError(f"parallel.cp={cp_size} x parallel.tp={tp_size} does not divide the world size {world}")
    if tp_size > 1:
        # fairscale's model-parallel layers read their groups from fairscale's own registry; making
        # the groups there makes them here too: tensor-parallel groups of consecutive ranks,
        # data-parallel groups of the ranks with the same position in their tensor-parallel group.
        from fairscale.nn.model_parallel import initialize as fs

        if not fs.model_parallel_is_initialized():
            fs.initialize_model_parallel(tp_size)
        _dp_group = fs.get_data_parallel_group()
        tp_rank = fs.get_model_parallel_rank()
    else:
        _dp_group = dist.group.WORLD
        tp_rank = 0
    _context_parallel = _make_context_parallel(rank, world, tp_size, cp_size)
    # made on every backend (a gloo world gets its own too), so the CPU tests run the GPU's code path
    _host_group = dist.new_group(backend="gloo") if world > 1 and host_group else None
    _state = ParallelState(
        rank=rank, world_size=world, local_rank=local_rank,
        dp_rank=dist.get_rank(_dp_group), dp_size=dist.get_world_size(_dp_group), tp_size=tp_size,
        device=torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu"),
        backend=backend, tp_rank=tp_rank, cp_size=cp_size, cp_rank=(rank // tp_size) % cp_size,
    )
    return _state


def _make_context_parallel(rank: int, world: int, tp: int, cp: int):
    """The context-parallel groups: ranks (d * cp + c) * tp + t for c = 0..cp-1, one per (d, t).
    Every rank takes part in making every group (torch.distributed's rule); None at cp = 1."""
    if cp == 1:
        return None
    from .context_parallel import ContextParallel

    mine = None
    for d in range(world // (tp * cp)):
        for t in range(tp):
            ranks = [(d * cp + c) * tp + t for c in range(cp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = ContextParallel(group, ranks.index(rank), cp)
    return mine


def context_parallel():
    """This rank's ContextParallel (parallel/context_parallel.py), None at parallel.cp = 1."""
    return _context_parallel


def get_state() -> ParallelState:
    if _state is None:
        raise RuntimeError("init_distributed() has not run")
    return _state


def dp_group():
    return _dp_group


def mpu():
    """What DeepSpeed takes as `mpu` (model-parallel unit): fairscale's group registry, so ZeRO
    shards over data-parallel ranks only and the gradient norm counts each weight once; None at tp=1."""
    if _state is None or _state.tp_size == 1:
        return None
    from fairscale.nn.model_parallel import initialize as fs

    return fs


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _reduce(values: list[float], op, group, on_host: bool = False) -> list[float]:
    """`values` reduced over `group` (None: every rank), as float64 on this rank's device, or in
    host memory with `on_host` (a gloo group's)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cpu" if on_host else get_state().device)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats over the data-parallel group (float64, exact for counts)."""
    return _reduce(values, dist.ReduceOp.SUM, _dp_group)


def all_reduce_max(values: list[float]) -> list[float]:
    """Max over the data-parallel group (world_max_on_host: over every rank, for decisions that every
    rank must take together, such as stopping: a tensor-parallel group spans several dp groups)."""
    return _reduce(values, dist.ReduceOp.MAX, _dp_group)


def world_max_on_host(values: list[float]) -> list[float]:
    """Max over every rank through the gloo group on host memory: an NCCL all-reduce would put a
    GPU tensor in the stream's queue and the host would wait for all the work queued before it
    (a whole training step) to read the result. For per-step decisions such as stopping."""
    # with parallel.host_group=false (no gloo group): through the backend's group over every rank
    return _reduce(values, dist.ReduceOp.MAX, _host_group, on_host=_host_group is not None)


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (the world); [obj] in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    global _state, _dp_group, _context_parallel, _host_group
    if _state is not None and _state.tp_size > 1:
        from fairscale.nn.model_parallel import initialize as fs

        fs.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _state, _dp_group, _context_parallel, _host_group = None, None, None, None
