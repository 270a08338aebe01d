"""TokenStream: the training batches of one data-parallel rank, resumable from a cursor.

All ranks read one global sequence of samples.  Step s of a run started at cursor c gives
rank r the samples c + s*B*dp + r*B + [0, B).  The cursor is the number of global samples
consumed so far: it does not depend on dp size or worker count, so a run resumed at another
data-parallel size continues the very same sequence, neither repeating nor skipping.
Ranks of one tensor-parallel group pass the same dp_rank and so get the same batches.
"""
from __future__ import annotations

import signal
import sys
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from retnet_train.data.config import DataConfig
from retnet_train.data.errors import DataError
from retnet_train.data.plan import Plan, make_batch

STATE_VERSION = 1
# Each hand-over from a loader worker to the trainer process costs a fixed ~0.3 ms, so a
# worker sends several consecutive steps at once: at least this many tokens per message.
TOKENS_PER_MESSAGE = 1 << 16


def _plain(x):
    """Tuples to lists, so that a cursor that went through YAML/JSON/OmegaConf compares equal."""
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def _as_is(batch):
    return batch


class _Failed:
    """What a loader worker sends instead of a chunk when the data is bad: the DataError's
    message, so that the trainer raises a DataError of that one line (naming shard and
    window), not torch's re-raise whose message is the worker's whole traceback."""

    def __init__(self, message: str):
        self.message = message


class _Chunks(IterableDataset):
    """Chunks of `steps` consecutive steps, as ([steps, B, seq_len + 1] tokens, [steps, B]
    sources).  Loader worker w of W makes chunks w, w+W, ...; the DataLoader takes one from
    each worker in turn, so the steps come out in order."""

    def __init__(self, plan: Plan, start: int, b: int, dp_rank: int, dp_size: int, steps: int):
        self.plan, self.start, self.b, self.dp_rank, self.dp_size = plan, start, b, dp_rank, dp_size
        self.steps = steps

    def __iter__(self):
        info = get_worker_info()
        chunk, every = (info.id, info.num_workers) if info else (0, 1)
        while True:
            step = chunk * self.steps + np.arange(self.steps)
            firsts = self.start + (step * self.dp_size + self.dp_rank) * self.b
            try:
                tokens, src = self.plan.tokens((firsts[:, None] + np.arange(self.b)).reshape(-1))
            except DataError as e:
                yield _Failed(str(e))
                return
            yield tokens.reshape(self.steps, self.b, -1), src.reshape(self.steps, self.b)
            chunk += every


def _ignore_signals_and_die_with_parent(_worker_id: int) -> None:
    """Loader workers ignore SIGTERM, SIGINT and SIGUSR1: a cluster signals the whole process
    group, and only the trainer must act on it (save a checkpoint, then exit); a worker killed
    by it would fail the trainer's next batch before the checkpoint is written.  They end
    when the trainer process dies, even by SIGKILL (a preempted or killed job): orphans would
    keep reading shards and hold the parent's output pipes open."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class TokenStream:
    def __init__(self, cfg: DataConfig, *, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.cfg, self.plan = cfg, Plan(cfg, seq_len)
        self.b, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self._samples = 0  # global samples consumed by all ranks: the cursor
        self._loads = 0    # bumped by load_state_dict so that a live iterator restarts

    @property
    def source_names(self) -> list[str]:
        """Names of the sources, indexed by the batches' `source` values."""
        return list(self.plan.names)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "samples": self._samples, "seed": self.plan.seed,
                "seq_len": self.plan.seq_len,
                # [name, weight] pairs: the order matters too (it numbers the sources)
                "sources": [[n, w] for n, w in zip(self.plan.names, self.plan.weights)]}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data cursor: version {state.get('version')!r}, expected {STATE_VERSION}")
        # The cursor counts samples of one particular global sequence; under another seed,
        # mixture or sample length the same count would point at different data.
        for key in ("seed", "seq_len", "sources"):
            if _plain(state.get(key)) != mine[key]:
                raise ValueError(f"data cursor: saved with {key}={state.get(key)!r} but the stream "
                                 f"has {key}={mine[key]!r}; the saved position does not apply")
        samples = state.get("samples")
        if not isinstance(samples, int) or samples < 0:
            raise ValueError(f"data cursor: 'samples' must be an int >= 0, got {samples!r}")
        self._samples = samples
        self._loads += 1

    def _batches(self, start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        workers = self.cfg.num_workers
        steps = max(1, TOKENS_PER_MESSAGE // (self.b * self.plan.seq_len)) if workers else 1
        chunks = _Chunks(self.plan, start, self.b, self.dp_rank, self.dp_size, steps)
        if workers:
            # Workers send the compact (uint16 tokens, source) arrays through the pipe; the
            # tensors are made here.  Tensors from workers would each cost a shared-memory
            # segment, several times the work of making the batch.
            chunks = DataLoader(chunks, batch_size=None, collate_fn=_as_is, num_workers=workers,
                                prefetch_factor=self.cfg.prefetch, persistent_workers=False,
                                worker_init_fn=_ignore_signals_and_die_with_parent)
        for chunk in chunks:
            if isinstance(chunk, _Failed):
                raise DataError(chunk.message)
            tokens, src = chunk
            yield from zip(tokens, src)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            loads = self._loads
            for tokens, src in self._batches(self._samples):
                if loads != self._loads:
                    break  # a cursor was loaded: drop what the workers prefetched, restart there
                # Advance before yielding: a state_dict() taken while the trainer holds this
                # batch must already count it.  Prefetched batches never touch the cursor.
                self._samples += self.b * self.dp_size
                yield make_batch(tokens, src, self.plan.tok)
