"""Held-out batches per source, and the vocabulary size, for the trainer."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from retnet_train.data.config import DataConfig
from retnet_train.data.plan import load_sources, make_batch
from retnet_train.data.source import SampleReader
from retnet_train.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def build_val_batches(cfg: DataConfig, *, seq_len: int, micro_batch_size: int, dp_rank: int,
                      dp_size: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """cfg.val_batches micro-batches per source from its validation split, the same on every
    call; ranks get disjoint samples (the split is reused cyclically if it is too small)."""
    tok, manifests = load_sources(cfg)
    b = micro_batch_size
    if cfg.val_batches == 0:
        return {name: [] for name in manifests}
    out = {}
    for i, (name, m) in enumerate(manifests.items()):
        reader = SampleReader(m, m.val_shards, seq_len)
        where = [(s, j) for s in range(len(m.val_shards)) for j in range(int(reader.samples[s]))]
        if not where:
            raise ValueError(f"data.sources.{name}.path: {m.dir} has no validation sample of "
                             f"seq_len {seq_len} (rebuild with a larger --val-fraction)")
        need = cfg.val_batches * b * dp_size
        if need > len(where):
            log.warning("source %s: %d validation samples of %d tokens, %d wanted: reusing them",
                        name, len(where), seq_len, need)
        batches = []
        for v in range(cfg.val_batches):
            first = (v * dp_size + dp_rank) * b
            tokens = np.empty((b, seq_len + 1), m.dtype)
            for row in range(b):
                reader.read(*where[(first + row) % len(where)], tokens[row])
            batches.append(make_batch(tokens, np.full(b, i), tok))
        out[name] = batches
    return out


def read_vocab_size(cfg: DataConfig) -> int:
    """Embedding rows the model needs: the tokenizer's pieces padded to a multiple of 128."""
    return load_tokenizer(Path(cfg.tokenizer))[1].vocab_size
