"""CUDA graphs of the decoding step, one per batch bucket and sampling kind (greedy, or sampled),
captured on first use and replayed.

A replay launches the whole step (every layer's kernels, sampling, the stop flags) with one host
call, where eager decoding spends more time launching a thousand small kernels than running them.
The graph reads and writes the engine's fixed buffers, so a call changes what it decodes by
writing into those buffers, never by recapturing.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # Triton compiles and cuBLAS picks its algorithms here, outside the capture


class StepGraphs:
    def __init__(self, step: Callable[[int, bool], None]):
        self.step = step  # step(batch, greedy)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.pool = None  # one memory pool for all buckets' graphs

    def ensure(self, batch: int, greedy: bool) -> None:
        """Capture the step at this batch size and kind if not yet done. The warm-up runs the step for
        real: call this before the buffers are filled for a generate call."""
        key = (batch, greedy)
        if key in self.graphs:
            return
        start = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step(batch, greedy)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step(batch, greedy)
        torch.cuda.synchronize()
        self.graphs[key] = graph
        log.info("captured the decoding step (batch %d, %s) in %.1f s", batch, "greedy" if greedy else "sampled",
                 time.perf_counter() - start)

    def replay(self, batch: int, greedy: bool) -> None:
        self.graphs[(batch, greedy)].replay()
