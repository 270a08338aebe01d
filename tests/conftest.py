"""Shared pytest set-up: GPU tests skip without CUDA; quiet, deterministic CPU defaults."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def _share_of_the_cores() -> None:
    """Under pytest-xdist (make test: one worker per core) each worker computes with its share of
    the cores, and so do the processes it spawns (mp.spawn; the trainer processes ask for 1 thread
    themselves). torch otherwise sizes its OpenMP pool to every core in every worker, and on CI's
    2 cores the threads of the two workers (and of the trainer processes they start) spin against
    each other: measured on the in-process model, inference and kernel tests, 217 s of CPU and
    352 s of wall time with -n 2, against 112 s and 186 s with one thread per worker."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_of_the_cores()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine: make test-gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
